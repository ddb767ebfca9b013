"""bench/serve.py's load scenarios on plait's engine in-process: a shared system prompt, and mixed load.

- **shared prefix**: ``requests`` prompts, each a ``system`` prompt followed by a short suffix of its own,
  all arriving at once, served with and without prefix caching. Each run starts from an empty cache,
  so "with" prefills the system prompt once and "without" once per request.
- **mixed load**: ``clients`` closed-loop clients, each sending ``per_client`` requests one after another
  (the next when its previous one ends), prompt lengths drawn uniformly from ``lengths``; served with
  chunked prefill (the engine's step budget) and with whole-prompt prefill (a budget as long as the
  longest prompt), so a long prompt stalls the running decodes only in the second. Besides TTFT and
  TPOT per request it records every gap between two tokens of a request (``gaps``: a stall shows there)
  and, after every step, the KV-cache blocks in use and the positions the running requests hold.
- **batch 1**: one request alone (``lengths``' midpoint prompt), the TPOT the mixed load is held against.
- **decodes only**: each mixed client's first prompt, all prefilled in one step, then decodes alone: the
  TPOT the batch of decodes costs with no prefill beside it.

Every scenario runs on ``tp`` local ranks and reports from the leader, in the format of bench/serve.py's
``plait_rank`` (``ttft``, ``tpot``, ``walls``, ``tokens``), plus ``gaps`` and ``kv`` (see :func:`kv_ratio`).
"""
from __future__ import annotations

import random
import time
from typing import Optional

import torch


def record_tokens(times: dict[str, list[float]], tokens: dict[str, list[int]], events) -> None:
    """Note the arrival time of every token among ``events``, and the token, per request id."""
    now = time.perf_counter()
    for event in events:
        if event.token is not None:
            times[event.rid].append(now)
            tokens[event.rid].append(event.token)


class ClosedLoopSource:
    """The leader's source for closed-loop clients: client ``c`` submits ``prompts[c][0]``, and its next prompt
    once the previous request ends; records each request's token times and, after each step, the cache's
    blocks in use and positions held."""

    def __init__(self, prompts: list[list[list[int]]], new: int, scheduler) -> None:
        self.prompts, self.new, self.scheduler = prompts, new, scheduler
        self.next = [0] * len(prompts)
        self.owner: dict[str, int] = {}
        self.times: dict[str, list[float]] = {}
        self.tokens: dict[str, list[int]] = {}
        self.sent: dict[str, float] = {}
        self.ready: list[int] = list(range(len(prompts)))
        self.kv: list[tuple[int, int]] = []
        self.start = 0.0
        self.stopped = False

    def poll(self, block: bool) -> list[tuple]:
        from plait.serve import Request, SamplingParams

        if not self.start:
            self.start = time.perf_counter()
        commands = []
        for client in self.ready:
            i = self.next[client]
            rid = f"{client}-{i}"
            self.owner[rid], self.times[rid], self.tokens[rid] = client, [], []
            self.sent[rid] = time.perf_counter()
            params = SamplingParams(max_tokens=self.new, ignore_eos=True)
            commands.append(("submit", Request(rid, list(self.prompts[client][i]), params)))
            self.next[client] += 1
        self.ready = []
        if not self.stopped and all(n >= len(p) for n, p in zip(self.next, self.prompts)):
            self.stopped = True
            commands.append(("stop",))                  # every request is in: drain, then stop
        return commands

    def emit(self, events) -> None:
        record_tokens(self.times, self.tokens, events)
        for event in events:
            if event.finish_reason is not None:
                client = self.owner[event.rid]
                if self.next[client] < len(self.prompts[client]):
                    self.ready.append(client)
        s = self.scheduler
        self.kv.append((s.pool.used, s.held_tokens))


def _summary(source: ClosedLoopSource, block_size: int) -> dict:
    ttft, tpot, gaps = [], [], []
    for rid, times in source.times.items():
        ttft.append(times[0] - source.sent[rid])
        if len(times) > 1:
            tpot.append((times[-1] - times[0]) / (len(times) - 1))
            gaps += [b - a for a, b in zip(times, times[1:])]
    end = max(t[-1] for t in source.times.values())
    return dict(ttft=ttft, tpot=tpot, gaps=gaps, walls=[end - source.start],
                tokens=[source.tokens[rid] for rid in sorted(source.tokens)],
                kv=[(used * block_size, held) for used, held in source.kv if held])


def load_rank(rank: int, world: int, tp: int, directory: str, prompts: list[list[list[int]]], new: int,
              dtype: str, engine_options: dict, max_len: int) -> Optional[dict]:
    """One scenario run on ``tp`` ranks: fresh engine, closed-loop clients (``prompts[c]`` per client)."""
    import plait
    from plait.serve import Engine
    from plait.serve.worker import cache_bytes_per_token

    plait.init_mesh(tp=tp)
    model = plait.from_pretrained(directory, plait.current_mesh(), dtype=getattr(torch, dtype))
    engine = Engine(model, max_batch=len(prompts), max_queue=len(prompts), max_len=max_len, eos=(),
                    **engine_options)
    source = ClosedLoopSource(prompts, new, engine.scheduler) if engine.is_leader else None
    engine.run(source)
    per_token = cache_bytes_per_token(model)
    plait.destroy_mesh()
    if source is None:
        return dict(bytes_per_token=per_token)
    return dict(_summary(source, engine.scheduler.block_size), bytes_per_token=per_token)


def shared_prefix_prompts(requests: int, system: int, suffix: int, vocab: int, seed: int) -> list[list[list[int]]]:
    """One single-request client per request: the same ``system`` tokens, then ``suffix`` tokens of its own."""
    rng = random.Random(seed)
    head = [rng.randrange(2, vocab) for _ in range(system)]
    return [[head + [rng.randrange(2, vocab) for _ in range(suffix)]] for _ in range(requests)]


def mixed_prompts(clients: int, per_client: int, lengths: tuple[int, int], vocab: int, seed: int
                  ) -> list[list[list[int]]]:
    """``per_client`` prompts per client, each of a length drawn uniformly from ``lengths``."""
    rng = random.Random(seed)
    return [[[rng.randrange(2, vocab) for _ in range(rng.randint(*lengths))] for _ in range(per_client)]
            for _ in range(clients)]


def kv_ratio(result: dict, ranks: list[dict], model_bytes_per_token: int) -> dict:
    """KV-cache memory per held position against the model's KV bytes per token: over the steps of a run,
    (positions in the blocks in use / positions held) x (bytes per position summed over the ranks) / the
    model's bytes per token. 1.0: the cache holds exactly the tokens' keys and values."""
    replica = sum(r["bytes_per_token"] for r in ranks)
    ratios = [blocks / held * replica / model_bytes_per_token for blocks, held in result["kv"]]
    return {"mean": round(sum(ratios) / len(ratios), 4), "max": round(max(ratios), 4),
            "replica_bytes_per_token": replica, "model_bytes_per_token": model_bytes_per_token,
            "steps": len(ratios)}
