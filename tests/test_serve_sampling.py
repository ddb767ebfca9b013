"""Penalties, log-probabilities and stop token ids in plait.serve's engine, float64, against transformers.

At (tp, pp) in (1,1), (2,1), (2,2), with penalized and plain requests sharing batches:

- greedy tokens with ``repetition_penalty`` equal transformers' ``generate(repetition_penalty=...)``;
- greedy tokens with ``presence_penalty`` / ``frequency_penalty`` equal OpenAI's definition applied to
  transformers' logits, one step at a time;
- ``logprobs`` equal ``log_softmax`` of transformers' logits (float64) for the chosen token and the
  top alternatives, likeliest first;
- a ``stop_token_ids`` hit ends the request with finish reason "stop", the id kept.
"""
from __future__ import annotations

import pytest
import torch

from plait.launch import run_ranks
from plait.serve import SamplingParams
from serve_models import reference_greedy, save_model

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

PROMPTS = [[2, 5, 7, 9], [3, 4], [10, 11, 12, 13, 14, 15, 16], [8, 6, 4, 2]]
NEW = 10
LAYOUTS = [(1, 1), (2, 1), (2, 2)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_model("llama", tmp_path_factory.mktemp("sampling") / "llama", seed=7)


def _reference_model(directory):
    import transformers as T

    return T.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float64).eval()


def _params(stop_id: int) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=NEW, repetition_penalty=1.7, logprobs=3),
            SamplingParams(max_tokens=NEW, presence_penalty=0.8, frequency_penalty=1.1),
            SamplingParams(max_tokens=NEW, logprobs=5),
            SamplingParams(max_tokens=NEW, stop_token_ids=[stop_id])]


def _run(rank: int, world: int, pp: int, tp: int, directory: str, stop_id: int) -> list:
    import plait
    from plait.serve import Engine

    plait.init_mesh(pp=pp, tp=tp)
    engine = Engine(plait.from_pretrained(directory, plait.current_mesh(), dtype=torch.float64), max_batch=3)
    done = engine.generate(PROMPTS, _params(stop_id), arrivals=[0, 1, 1, 2])
    plait.destroy_mesh()
    return [(c.token_ids, c.finish_reason, c.logprobs, c.top_logprobs) for c in done]


def _penalized_greedy(model, prompt: list[int], presence: float, frequency: float) -> list[int]:
    """OpenAI's presence/frequency penalties on transformers' logits, greedy, one token at a time."""
    ids, out = list(prompt), []
    for _ in range(NEW):
        logits = model(torch.tensor([ids])).logits[0, -1]
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).double()
        token = int(torch.argmax(logits - frequency * counts - presence * (counts > 0).double()))
        ids.append(token)
        out.append(token)
        if token == 1:
            break
    return out


def _logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log_softmax (float64) of transformers' logits at the positions that predicted ``tokens``."""
    logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:len(prompt) - 1 + len(tokens)]
    return torch.log_softmax(logits.double(), dim=-1)


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_penalties_logprobs_and_stop_ids_match_transformers(llama, tp, pp):
    model = _reference_model(llama)
    plain = [reference_greedy(llama, p, NEW) for p in PROMPTS]
    stop_id = plain[3][4]
    stop_at = plain[3].index(stop_id) + 1
    with torch.no_grad():
        repetition = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=NEW, do_sample=False,
                                    repetition_penalty=1.7, attention_mask=torch.ones(1, 4, dtype=torch.long))
        repetition = repetition[0, 4:].tolist()
        penalized = _penalized_greedy(model, PROMPTS[1], 0.8, 1.1)
    assert repetition != plain[0] and penalized != plain[1], "the penalties changed nothing: a weak test"

    results = run_ranks(_run, tp * pp, pp, tp, llama, stop_id, timeout=300)
    for rank, result in enumerate(results):
        (rep_tokens, _, rep_lp, rep_top), (pen_tokens, _, _, _), (lp_tokens, _, lp, lp_top), stopped = result
        where = f"tp={tp} pp={pp} rank {rank}"
        assert rep_tokens == repetition, f"{where}: repetition_penalty {rep_tokens} != transformers' {repetition}"
        assert pen_tokens == penalized, f"{where}: presence/frequency {pen_tokens} != {penalized}"
        assert lp_tokens == plain[2], where
        with torch.no_grad():
            for prompt, tokens, got, top, k in ((PROMPTS[0], rep_tokens, rep_lp, rep_top, 3),
                                                (PROMPTS[2], lp_tokens, lp, lp_top, 5)):
                want = _logprobs(model, prompt, tokens)
                chosen = want[torch.arange(len(tokens)), torch.tensor(tokens)]
                torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), chosen, rtol=0, atol=1e-10)
                best = torch.topk(want, k, dim=-1)
                assert [[i for i, _ in t] for t in top] == best.indices.tolist(), where
                torch.testing.assert_close(torch.tensor([[v for _, v in t] for t in top], dtype=torch.float64),
                                           best.values, rtol=0, atol=1e-10)
        assert stopped[0] == plain[3][:stop_at] and stopped[1] == "stop", f"{where}: {stopped[:2]}"
        assert stopped[2] == [], "a request without logprobs reported some"


@pytest.mark.parametrize("bad,message", [
    (dict(presence_penalty=2.5), "presence_penalty must be a number in [-2, 2]"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(logprobs=21), "logprobs must be an integer in [0, 20]"),
    (dict(logprobs=True), "logprobs"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_sampling_params_refuse_bad_penalties(bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**bad)


def test_histories_follow_the_step_messages():
    """The sampler's record of a penalized request: prompt ids seen, output ids counted, positions in order."""
    from plait.serve.sampler import Histories

    histories = Histories(vocab_size=8)
    histories.feed(7, 0, [1, 2, 2], prompt_len=4)        # a first prefill chunk
    histories.feed(7, 3, [3, 5], prompt_len=4)           # the prompt's last token, then the first output
    histories.feed(7, 5, [5], prompt_len=4)
    record = histories.records[7]
    assert record.seen.nonzero().flatten().tolist() == [1, 2, 3, 5]
    assert record.counts.tolist() == [0, 0, 0, 0, 0, 2, 0, 0] and record.length == 6
    with pytest.raises(RuntimeError, match="request 7 sent positions from 9, but 6 are recorded"):
        histories.feed(7, 9, [1], prompt_len=4)
    histories.release([7])
    assert not histories.records
