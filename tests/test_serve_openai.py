"""``plait serve`` through the official ``openai`` Python SDK: the fields users rely on, in OpenAI's shapes.

One server (tp=1, float64) for the module. Checked: ``n`` choices with seeds (choice ``i`` of seed
``s`` is the single choice of seed ``s + i``), a list of prompts, ``logprobs`` (completions and
chat, whole and streamed) equal to ``log_softmax`` of transformers' logits, ``echo``, ``stop``
strings and ``stop_token_ids``, penalties, ``max_completion_tokens``, usage in streams only with
``stream_options.include_usage``, and a 400 that names each unsupported field; an unknown model
is the SDK's ``NotFoundError`` with code ``model_not_found``.
"""
from __future__ import annotations

import json

import pytest
import torch

from serve_models import reference_greedy, save_model, serving

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("transformers")

MODEL = "tiny-openai"
PROMPT = [2, 5, 7, 9]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = save_model("llama", tmp_path_factory.mktemp("openai") / MODEL, seed=3)
    with serving(directory, "--max-batch", "4", "--dtype", "float64", "--request-timeout", "120", "--block-size", "4",
                 "--max-step-tokens", "8", "--kv-memory", "0.001") as running:
        yield dict(running, dir=directory,
                   client=openai.OpenAI(base_url=running["url"] + "/v1", api_key="none", max_retries=0))


def _reference_logprobs(directory: str, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:len(prompt) - 1 + len(tokens)]
    return torch.log_softmax(logits, dim=-1)


def test_n_choices_with_seeds(server):
    client = server["client"]
    many = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=40, n=3,
                                     extra_body={"ignore_eos": True})
    assert [c.index for c in many.choices] == [0, 1, 2]
    tokens = [c.model_extra["token_ids"] for c in many.choices]
    assert len({tuple(t) for t in tokens}) > 1, "n choices drew the same tokens"
    for i in range(3):
        one = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=40 + i,
                                        extra_body={"ignore_eos": True})
        assert one.choices[0].model_extra["token_ids"] == tokens[i]
    assert many.usage.prompt_tokens == 4 and many.usage.completion_tokens == 18


def test_list_of_prompts_times_n(server):
    prompts = [[2, 3], [4, 5, 6]]
    reply = server["client"].completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    for c in reply.choices:
        assert c.model_extra["token_ids"] == reference_greedy(server["dir"], prompts[c.index // 2], 4)
    assert reply.usage.prompt_tokens == 5


def test_completion_logprobs_whole_and_streamed(server):
    client = server["client"]
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    choice = reply.choices[0]
    tokens = choice.model_extra["token_ids"]
    want = _reference_logprobs(server["dir"], PROMPT, tokens)
    got = choice.logprobs
    assert len(got.tokens) == len(got.token_logprobs) == len(got.top_logprobs) == len(tokens)
    chosen = want[torch.arange(len(tokens)), tokens]
    assert torch.allclose(torch.tensor(got.token_logprobs, dtype=torch.float64), chosen, atol=1e-9)
    for top, row in zip(got.top_logprobs, want):
        assert sorted(top.values(), reverse=True) == pytest.approx(torch.topk(row, 3).values.tolist(), abs=1e-9)
    assert got.text_offset == sorted(got.text_offset) and got.text_offset[0] == 0
    assert "".join(got.tokens) == "".join(choice.text.split(" "))       # the word-level tokenizer joins with spaces
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                              stream=True))
    lps = [lp for chunk in streamed for c in chunk.choices if c.logprobs for lp in c.logprobs.token_logprobs]
    assert lps == pytest.approx(got.token_logprobs, abs=1e-12)


def test_chat_logprobs_stream_usage_and_max_completion_tokens(server):
    client = server["client"]
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "the cat"}]}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-12
        assert bytes(entry.bytes).decode() == entry.token
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5,
                                                 temperature=0, logprobs=True, top_logprobs=2, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == whole.choices[0].message.content
    streamed = [e.logprob for c in chunks[:-1] if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == [e.logprob for e in content]
    assert chunks[-2].choices[0].finish_reason == "length"


def test_a_repeated_prompt_is_read_from_the_prefix_cache(server):
    client, prompt = server["client"], list(range(3, 23))           # 20 tokens: chunked, 5 blocks of 4
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 16      # all but the block of the last token
    assert second.choices[0].model_extra["token_ids"] == reference_greedy(server["dir"], prompt, 3)
    metrics = httpx.get(server["url"] + "/metrics").text
    assert 'plait_prefix_cache_hit_tokens{replica="0"} 16.0' in metrics


def test_stream_without_include_usage_has_no_usage_chunk(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body, timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert events and all(e["choices"] for e in events) and all("usage" not in e for e in events)


def test_echo_stops_and_penalties(server):
    client, directory = server["client"], server["dir"]
    plain = reference_greedy(directory, PROMPT, 8)
    echoed = client.completions.create(model=MODEL, prompt="the cat sat", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("the cat sat")
    stop_id = plain[3]
    stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                        extra_body={"stop_token_ids": [stop_id]})
    assert stopped.choices[0].model_extra["token_ids"] == plain[:plain.index(stop_id) + 1]
    assert stopped.choices[0].finish_reason == "stop"
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    words = full.choices[0].text.split(" ")
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=[words[2]])
    assert cut.choices[0].finish_reason == "stop" and words[2] not in cut.choices[0].text
    penalized = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                          presence_penalty=2, frequency_penalty=2,
                                          extra_body={"repetition_penalty": 2.0})
    assert penalized.choices[0].model_extra["token_ids"] != reference_greedy(directory, PROMPT, 10)


@pytest.mark.parametrize("extra,message", [
    ({"logit_bias": {"3": 5}}, "does not support the field 'logit_bias'"),
    ({"suffix": "x"}, "does not support the field 'suffix'"),
    ({"echo": True, "logprobs": 1}, "echo with logprobs is not supported"),
    ({"best_of": 3}, "best_of must equal n"),
    ({"n": 0}, "n must be an integer in [1, 128]"),
    ({"logprobs": 21}, "logprobs must be an integer in [0, 20]"),
    ({"presence_penalty": 3}, "presence_penalty must be a number in [-2, 2]"),
    ({"stream_options": {"include_usage": True}}, "stream_options is only allowed when stream is true"),
])
def test_unsupported_or_bad_completion_fields_are_400(server, extra, message):
    with pytest.raises(openai.BadRequestError) as err:
        server["client"].completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body=extra)
    assert message in err.value.body["message"]


@pytest.mark.parametrize("extra,message", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "does not support the field 'tools'"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs set to true"),
    ({"response_format": {"type": "json_object"}}, "does not support the field 'response_format'"),
])
def test_unsupported_chat_fields_are_400(server, extra, message):
    with pytest.raises(openai.BadRequestError) as err:
        server["client"].chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "the"}],
                                                 max_tokens=2, extra_body=extra)
    assert message in err.value.body["message"]


def test_unknown_model_is_not_found(server):
    with pytest.raises(openai.NotFoundError) as err:
        server["client"].completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.status_code == 404
    cards = server["client"].models.list().data
    assert [m.id for m in cards] == [server["dir"], MODEL]
    assert cards[0].model_extra["plait"] == {"dtype": "float64", "dtype_choice": "as asked", "device": "cpu",
                                             "tp": 1, "pp": 1, "dp": 1}
    assert 'plait_served_info{device="cpu",dtype="float64"} 1.0' in httpx.get(server["url"] + "/metrics").text
