"""``plait serve`` over two test hosts (tests/hosts.py): the router and one replica on host 0, a second
replica on host 1 joining with ``--replica-of``; clients (this process) talk to host 0 only.

In order: 16 concurrent clients, streaming and not, get transformers' greedy tokens; host 1's link is
cut while 16 more stream: /health reports its replica down within seconds, every request that had not
received a token before the cut completes with the greedy tokens (failed over to host 0), and one that
had ends with an error naming host 1; the link comes back and so does the replica; SIGTERM on host 1
while it streams lets it finish the request and leave; both hosts stop cleanly. Then a router refuses a host serving another model.
"""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest

from serve_models import reference_greedy, save_model

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("transformers")

MODEL = "tiny"
NEW = 16
PROMPTS = [[2 + i % 9, 5 + i % 4, 7, 9 + i % 5][: 2 + i % 3] for i in range(16)]


def serve_argv(directory: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "plait", "serve", "--model", directory, "--dp", "1", "--max-batch", "2",
            "--max-queue", "8", "--dtype", "float64", "--request-timeout", "120", *extra]


def wait_until(check, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.2)


async def _stream(client, url: str, prompt: list[int], started: dict, index: int,
                  **extra) -> tuple[list[int], str]:
    """One streaming completion: (tokens, error message or ""); ``started[index]`` is when its first token came."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": NEW, "temperature": 0, "stream": True, **extra}
    tokens, error = [], ""
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=180) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if "error" in data:
                error = data["error"]["message"]
            for choice in data.get("choices", []):
                if choice["token_ids"] and index not in started:
                    started[index] = time.monotonic()
                tokens += choice["token_ids"]
    return tokens, error


async def _plain(client, url: str, prompt: list[int]) -> tuple[list[int], str]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": NEW, "temperature": 0}
    response = await client.post(f"{url}/v1/completions", json=body, timeout=180)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"], ""


def test_two_host_serve_answers_and_survives_losing_a_host(make_hosts, tmp_path_factory):
    directory = save_model("llama", tmp_path_factory.mktemp("serve2") / MODEL, seed=3)
    want = [reference_greedy(directory, p, NEW) for p in PROMPTS]
    hosts = make_hosts(2)
    url = f"http://{hosts[0].addr}:8000"
    router = hosts[0].popen(serve_argv(directory, "--host", "0.0.0.0", "--port", "8000"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    replica = hosts[1].popen(serve_argv(directory, "--replica-of", f"{hosts[0].name}:8000", "--port", "8001"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = wait_until(lambda: (h := httpx.get(f"{url}/health", timeout=2).json())["status"] == "ok"
                            and len(h["replicas"]) == 2 and h, "two replicas up")
        assert [r["host"] for r in health["replicas"]] == ["host0", "host1"]
        assert health["replicas"][1]["url"] == f"http://{hosts[1].addr}:8001"

        async def all_at_once(streamed: bool):
            started: dict = {}
            async with httpx.AsyncClient() as client:
                calls = [_stream(client, url, p, started, i) if streamed or i % 2 else _plain(client, url, p)
                         for i, p in enumerate(PROMPTS)]
                return await asyncio.gather(*calls), started

        results, _ = asyncio.run(all_at_once(streamed=False))
        assert [tokens for tokens, _ in results] == want

        # ---- host 1's link is cut while 16 requests stream: 2 run on each replica, 6 wait on each
        async def lose_host_1():
            started: dict = {}
            async with httpx.AsyncClient() as client:
                calls = asyncio.gather(*[_stream(client, url, p, started, i) for i, p in enumerate(PROMPTS)])
                task = asyncio.ensure_future(calls)
                while len(started) < 4 and not task.done():
                    await asyncio.sleep(0.01)
                hosts.cut(1)
                return await task, started

        results, started = asyncio.run(lose_host_1())
        failed = [i for i, (_, error) in enumerate(results) if error]
        for i, (tokens, error) in enumerate(results):
            if error:   # only a request that had streamed may fail, and what it got is the greedy prefix
                assert tokens and tokens == want[i][:len(tokens)], f"request {i} failed before it streamed: {error}"
                assert "replica 1 (host1) failed" in error and "host1" in error, error
            else:
                assert tokens == want[i], f"request {i}"
        assert len(failed) <= 2, failed                  # at most host 1's running batch
        down = wait_until(lambda: (r := httpx.get(f"{url}/health", timeout=2).json()["replicas"][1])["status"]
                          == "down" and r, "replica 1 down", timeout=10)
        assert "host1" in down["reason"] and "does not answer" in down["reason"], down
        assert 'plait_replica_up{replica="1"} 0.0' in httpx.get(f"{url}/metrics").text

        # ---- the link comes back: so does the replica, and both serve again
        hosts.restore(1)
        wait_until(lambda: httpx.get(f"{url}/health", timeout=2).json()["status"] == "ok", "replica 1 back",
                   timeout=30)
        results, _ = asyncio.run(all_at_once(streamed=True))
        assert [tokens for tokens, _ in results] == want

        # ---- SIGTERM on host 1 while it streams: it finishes the request, then leaves
        async def stop_host_1_midway():
            started: dict = {}
            async with httpx.AsyncClient() as client:
                task = asyncio.ensure_future(asyncio.gather(   # the first goes to replica 0, the second to 1
                    *[_stream(client, url, p, started, i, max_tokens=40, ignore_eos=True)
                      for i, p in enumerate(PROMPTS[:2])]))
                while len(started) < 2:
                    await asyncio.sleep(0.01)
                replica.send_signal(signal.SIGTERM)
                seen, deadline = [], time.monotonic() + 60     # replica 1's states as the router reports them
                while (not task.done() or replica.poll() is None) and time.monotonic() < deadline:
                    seen.append((await client.get(f"{url}/health")).json()["replicas"][1]["status"])
                    await asyncio.sleep(0.05)
                return await task, seen

        results, seen = asyncio.run(stop_host_1_midway())
        assert [(len(tokens), error) for tokens, error in results] == [(40, "")] * 2
        assert replica.wait(timeout=60) == 0
        assert "draining" in seen and "down" not in seen, seen    # told the router first; never seen as lost
        assert httpx.get(f"{url}/health").json()["replicas"][1]["status"] == "stopped"
        router.send_signal(signal.SIGTERM)
        assert router.wait(timeout=60) == 0
        assert hosts[1].shm_files() == [] and hosts[0].shm_files() == []
    finally:
        for proc in (replica, router):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_router_refuses_a_host_with_another_model(tmp_path):
    """On one host (loopback): a replica host whose model differs is refused before it loads anything."""
    from plait.launch import free_port

    one = save_model("llama", tmp_path / "a" / MODEL, seed=3)
    other = save_model("llama", tmp_path / "b" / MODEL, seed=3)
    (tmp_path / "b" / MODEL / "config.json").write_text(
        (tmp_path / "b" / MODEL / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    port = free_port()
    router = subprocess.Popen(serve_argv(one, "--port", str(port)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200, "router up")
        refused = subprocess.run(serve_argv(other, "--replica-of", f"127.0.0.1:{port}", "--port", str(free_port())),
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2
        assert "refused this host: the replica host serves another model than this router (config:" in refused.stderr
    finally:
        router.send_signal(signal.SIGTERM)
        assert router.wait(timeout=60) == 0
