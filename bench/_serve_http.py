"""bench/serve.py's load generator through the HTTP server: ``plait serve --dp D`` and its router.

:func:`serving` starts ``python -m plait serve`` as a subprocess on a free port and waits until
``/health`` answers 200 (every replica loaded); on leaving it sends SIGTERM, which drains and stops every
rank. :func:`drive` sends each prompt as one streaming ``/v1/completions`` request (token ids, greedy,
``ignore_eos``), all clients at once, once per run, and times every token's server-sent event:
TTFT from sending to the first token, TPOT over the rest, a run's wall from sending to the last token;
the tokens of the last run are kept to compare with the other contenders'.
Needs ``httpx`` (the client) and the serve extra (fastapi, uvicorn) in the server's environment.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import signal
import subprocess
import sys
import time
from typing import Iterator

from plait.launch import free_port

STARTUP_S = 600.0
REQUEST_S = 3600.0


def available() -> bool:
    """Whether this environment has the client (httpx) and the server (fastapi, uvicorn)."""
    return all(importlib.util.find_spec(m) is not None for m in ("httpx", "fastapi", "uvicorn"))


@contextlib.contextmanager
def serving(directory: str, dp: int, tp: int, max_batch: int, max_len: int) -> Iterator[str]:
    """A ``plait serve`` of ``directory`` (float32) on 127.0.0.1; yields its base URL."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "plait", "serve", "--model", directory, "--dp", str(dp), "--tp", str(tp),
               "--dtype", "float32", "--port", str(port), "--max-batch", str(max_batch),
               "--max-queue", "4096", "--max-len", str(max_len)]
    proc = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"plait serve exited with {proc.returncode} before it was ready: {command}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"plait serve was not ready within {STARTUP_S:g} s: {command}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _request(client, url: str, model: str, prompt: list[int], new: int, start: float) -> tuple[list[float], list[int]]:
    """One streamed completion: the time of each token's event since ``start``, and the tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True, "stream": True}
    times: list[float] = []
    tokens: list[int] = []
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"POST /v1/completions: status {response.status_code}: {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise RuntimeError(f"POST /v1/completions failed: {event['error']}")
            for choice in event.get("choices", []):
                tokens += choice.get("token_ids", [])
                times += [time.perf_counter() - start] * len(choice.get("token_ids", []))
    if len(times) != new:
        raise RuntimeError(f"the server sent {len(times)} tokens, expected {new}")
    return times, tokens


async def _run(url: str, prompts: list[list[int]], new: int, runs: int, warmup: int) -> dict:
    import httpx

    ttft, tpot, walls, tokens = [], [], [], []
    limits = httpx.Limits(max_connections=len(prompts) + 1)
    async with httpx.AsyncClient(timeout=REQUEST_S, limits=limits) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        for run in range(warmup + runs):
            start = time.perf_counter()
            replies = await asyncio.gather(*(_request(client, url, model, p, new, start) for p in prompts))
            if run < warmup:
                continue
            times, tokens = [r[0] for r in replies], [r[1] for r in replies]
            walls.append(max(t[-1] for t in times))
            ttft += [t[0] for t in times]
            tpot += [(t[-1] - t[0]) / (len(t) - 1) for t in times]
    return dict(ttft=ttft, tpot=tpot, walls=walls, tokens=tokens)


def drive(url: str, prompts: list[list[int]], new: int, runs: int, warmup: int) -> dict:
    """``len(prompts)`` concurrent clients, one request each per run (see the module docstring)."""
    return asyncio.run(_run(url, prompts, new, runs, warmup))
