"""``plait serve`` as a user meets it: a real server on 127.0.0.1 (dp=2 replicas), driven with httpx.

In order (one server for the module): concurrent streaming and non-streaming requests
give transformers' greedy tokens (which ``plait generate`` is tested to equal) and its
decoded text; each bad input gets its status and message; a full queue answers 503 with
Retry-After; a killed replica rank is reported by /health within seconds while the other
replica keeps serving; SIGTERM lets an in-flight request finish, stops every rank, exits 0
and leaves nothing new in /dev/shm.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from serve_models import reference_greedy, save_model, serving

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("transformers")

MODEL = "tiny"
PROMPTS = [[2, 5, 7, 9], [3, 4], [10, 11, 12, 13, 14, 15, 16], [8, 6, 4, 2]]


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = save_model("llama", tmp_path_factory.mktemp("http") / MODEL, seed=3)
    before = _shm()
    with serving(directory, "--dp", "2", "--max-batch", "2", "--max-queue", "1", "--dtype", "float64",
                 "--request-timeout", "120") as running:
        yield dict(running, dir=directory, shm_before=before)


def _complete(client, url: str, prompt, stream: bool, **extra):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": stream, **extra}
    return client.post(f"{url}/v1/completions", json=body, timeout=120)


async def _one(client, url: str, prompt, stream: bool) -> tuple[list[int], str]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": stream}
    if not stream:
        response = await client.post(f"{url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return choice["token_ids"], choice["text"]
    tokens, text = [], ""
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                tokens += choice["token_ids"]
                text += choice["text"]
    return tokens, text


def test_concurrent_streaming_and_plain_requests(server):
    from transformers import AutoTokenizer

    async def all_at_once():
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*[_one(client, server["url"], p, stream=i % 2 == 0)
                                          for i, p in enumerate(PROMPTS)])

    tokenizer = AutoTokenizer.from_pretrained(server["dir"])
    for prompt, (tokens, text) in zip(PROMPTS, asyncio.run(all_at_once())):
        assert tokens == reference_greedy(server["dir"], prompt, 8)
        assert text == tokenizer.decode(tokens, skip_special_tokens=True)


def test_text_prompt_chat_models_and_metrics(server):
    url = server["url"]
    text = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "the cat sat", "max_tokens": 4,
                                                     "temperature": 0}, timeout=120)
    assert text.status_code == 200 and text.json()["usage"]["prompt_tokens"] == 3
    chat = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "max_tokens": 4, "temperature": 0,
                                                          "messages": [{"role": "user", "content": "the dog"}]},
                      timeout=120)
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"
    metrics = httpx.get(f"{url}/metrics").text
    for name in ("plait_requests_total", "plait_time_to_first_token_seconds_bucket",
                 "plait_time_per_output_token_seconds_bucket", "plait_running_requests", "plait_waiting_requests",
                 "plait_kv_cache_usage"):
        assert name in metrics


@pytest.mark.parametrize("change,message,param", [
    ({"prompt": list(range(2, 36)) * 2}, "more than the context of 64", "prompt"),
    ({"prompt": list(range(2, 34)) * 2}, "leaves none of the model's context of 64", "prompt"),
    ({"max_tokens": 63}, "max_tokens is 63, but only 62 tokens of the model's context are left", "max_tokens"),
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1", "max_tokens"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0", "temperature"),
    ({"top_p": 0}, "top_p must be a number in (0, 1]", "top_p"),
    ({"top_p": 1.5}, "top_p must be a number in (0, 1]", "top_p"),
    ({"logprobs": 21}, "logprobs must be an integer in [0, 20]", "logprobs"),
    ({"presence_penalty": 3}, "presence_penalty must be a number in [-2, 2]", "presence_penalty"),
    ({"stop": [""]}, "stop must be a string or a list of non-empty strings", "stop"),
    ({"stop_token_ids": [99]}, "stop_token_ids must lie in [0, 37)", "stop_token_ids"),
    ({"max_tokens": "5"}, "max_tokens", "max_tokens"),
    ({"prompt": 5}, "prompt", "prompt"),
    ({"prompt": [1, 99]}, "[0, 37)", "prompt"),
    ({"timeout": 0}, "timeout must be a finite number of seconds > 0", "timeout"),
    ({"timeout": -2.5}, "timeout must be a finite number of seconds > 0", "timeout"),
    ({"timeout": "5"}, "timeout", "timeout"),
    ({"Temperature": 1}, "does not support the field 'Temperature'", "Temperature"),
    ({"max_tokens": 62, "prompt": [1, 2, 3]}, "max_tokens is 62, but only 61", "max_tokens"),
])
def test_bad_input_is_400(server, change, message, param):
    body = {"model": MODEL, "prompt": [1, 2], "max_tokens": 4, **change}
    response = httpx.post(f"{server['url']}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error", error
    assert error["param"] == param, error


@pytest.mark.parametrize("change,message,param", [
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs must be an integer in [0, 20]", "top_logprobs"),
    ({"max_completion_tokens": -5}, "max_completion_tokens must be an integer >= 1", "max_completion_tokens"),
    ({"max_completion_tokens": 70}, "max_completion_tokens is 70, but only", "max_completion_tokens"),
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1", "max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "txt": "x"}]}]},
     "does not support the field 'messages.0.content.0.txt'", "messages.0.content.0.txt"),
])
def test_bad_chat_input_names_the_field_sent(server, change, message, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "the dog"}], **change}
    response = httpx.post(f"{server['url']}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param, error


def test_malformed_json_and_the_context_bound(server):
    """A body that is not JSON says so (no field named); chat's default completion fills the context and no
    more, as /v1/models advertises it (vLLM's rule: prompt + completion <= max_model_len)."""
    url = server["url"]
    broken = httpx.post(f"{url}/v1/completions", content=b'{"model": "tiny", "prompt": [1,', timeout=60,
                        headers={"content-type": "application/json"})
    assert broken.status_code == 400, broken.text
    error = broken.json()["error"]
    assert error["message"].startswith("the request body is not valid JSON") and error["param"] is None, error
    context = httpx.get(f"{url}/v1/models").json()["data"][0]["max_model_len"]
    chat = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": MODEL, "temperature": 0, "ignore_eos": True, "messages": [{"role": "user", "content": "the dog"}]})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["total_tokens"] == context, chat.json()["usage"]
    for prompt, max_tokens in (([2] * (context - 1), None), ([2] * (context - 3), 3)):   # room 1; exactly the room
        body = {"model": MODEL, "prompt": prompt, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(f"{url}/v1/completions", json=body if max_tokens is None else {**body, "max_tokens": max_tokens},
                           timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["total_tokens"] == context, reply.json()["usage"]


def test_served_names_and_unknown_model_is_404(server):
    """vLLM's convention: the --model string as given names the model (the directory's name too); an unknown
    model is a 404 in OpenAI's error shape, on every route that takes a model."""
    url, path = server["url"], server["dir"]
    listed = [card["id"] for card in httpx.get(f"{url}/v1/models").json()["data"]]
    assert listed == [path, MODEL]
    for name in (path, MODEL):
        reply = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": [2, 3], "max_tokens": 2},
                           timeout=60)
        assert reply.status_code == 200 and reply.json()["model"] == name, reply.text
        assert httpx.get(f"{url}/v1/models/{name}").json()["id"] == name
    for route, body in (("completions", {"prompt": [2, 3]}),
                        ("chat/completions", {"messages": [{"role": "user", "content": "the cat"}]})):
        reply = httpx.post(f"{url}/v1/{route}", json={"model": "gpt-4", **body}, timeout=60)
        assert reply.status_code == 404, reply.text
        assert reply.json() == {"error": {"message": f"The model `gpt-4` does not exist. This server serves "
                                                     f"`{path}`, `{MODEL}`.", "type": "invalid_request_error",
                                          "param": "model", "code": "model_not_found"}}
    assert httpx.get(f"{url}/v1/models/gpt-4").status_code == 404


def test_full_queue_is_503_with_retry_after(server):
    async def flood():
        async with httpx.AsyncClient() as client:
            body = {"model": MODEL, "prompt": [2, 3], "max_tokens": 40, "ignore_eos": True, "temperature": 0}
            return await asyncio.gather(*[client.post(f"{server['url']}/v1/completions", json=body, timeout=120)
                                          for _ in range(10)])

    statuses = [r.status_code for r in asyncio.run(flood())]
    rejected = [r for r in statuses if r == 503]
    assert statuses.count(200) >= 6 and rejected, statuses      # 2 replicas x (2 slots + 1 queued)


def test_request_past_its_deadline_is_504_and_frees_its_slot(server):
    url = server["url"]
    body = {"model": MODEL, "prompt": [2, 3], "max_tokens": 60, "ignore_eos": True, "temperature": 0,
            "timeout": 0.001}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["type"] == "timeout" and "deadline of 0.001 s" in error["message"]
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    assert stream.status_code == 200 and "deadline" in events[-1]["error"]["message"]
    tokens = sum((len(c["token_ids"]) for e in events[:-1] for c in e["choices"]), 0)
    assert tokens < 60
    deadline = time.monotonic() + 10
    while True:          # the replicas report every 0.25 s: both slots free again, nothing waiting
        replicas = httpx.get(f"{url}/health").json()["replicas"]
        if all(r["running"] == 0 and r["waiting"] == 0 for r in replicas):
            break
        assert time.monotonic() < deadline, f"a late request kept its slot: {replicas}"
        time.sleep(0.1)
    ok = _complete(httpx, url, PROMPTS[0], stream=False, timeout=60)
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["token_ids"] == reference_greedy(server["dir"], PROMPTS[0], 8)


def test_killed_replica_is_reported_and_survived(server):
    url = server["url"]
    victim = httpx.get(f"{url}/health").json()["replicas"][0]["pids"][0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while True:
        health = httpx.get(f"{url}/health")
        if health.json()["replicas"][0]["status"] == "down":
            break
        assert time.monotonic() < deadline, "replica 0 not reported down within 5 s"
        time.sleep(0.1)
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert "exited" in health.json()["replicas"][0]["reason"]
    for prompt in PROMPTS[:2]:
        response = _complete(httpx, url, prompt, stream=False)
        assert response.status_code == 200
        assert response.json()["choices"][0]["token_ids"] == reference_greedy(server["dir"], prompt, 8)


def test_sigterm_drains_and_cleans_up(server):
    url, proc = server["url"], server["proc"]
    pids = [p for r in httpx.get(f"{url}/health").json()["replicas"] for p in r["pids"]]
    tokens = []
    body = {"model": MODEL, "prompt": [2, 3], "max_tokens": 30, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and not tokens:
                proc.send_signal(signal.SIGTERM)           # the request is in flight
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    tokens += choice["token_ids"]
    assert len(tokens) == 30
    assert proc.wait(timeout=60) == 0
    alive = [p for p in pids if os.path.exists(f"/proc/{p}") and "zombie" not in open(f"/proc/{p}/status").read().lower()]
    assert not alive, f"rank processes {alive} outlived the server"
    left = {name for name in _shm() - server["shm_before"] if not name.startswith("sem.mp-")}
    assert not left, f"/dev/shm entries left behind: {sorted(left)}"


def test_a_replica_that_cannot_load_says_why(tmp_path):
    """A directory with a config but no weights: the server exits 1 with the loading rank's own error, not just
    its exit code (the router read the ranks' error queue twice and lost it)."""
    import subprocess
    import sys

    from plait.launch import free_port

    directory = save_model("llama", tmp_path / MODEL, seed=3)
    for weights in tmp_path.joinpath(MODEL).glob("*.safetensors"):
        weights.unlink()
    out = subprocess.run([sys.executable, "-m", "plait", "serve", "--model", directory, "--port", str(free_port())],
                         capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 1, out.stderr
    assert "replica 0 failed to start" in out.stderr and "no model.safetensors" in out.stderr, out.stderr
