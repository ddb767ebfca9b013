"""plait.serve's engine against transformers, in float64, on every layout.

- greedy tokens equal transformers' greedy ``generate`` of each prompt alone, token for
  token, for Llama (GQA), Qwen2 (QKV bias) and GPT-2 at (tp, pp) in (1,1), (2,1), (1,2), (2,2),
  with requests of different lengths joining a running batch and waiting for a free slot;
- seeded sampling gives the same tokens batched or alone, run after run, and every rank
  receives the same tokens;
- the scheduler refuses what can never run and bounds its queue.
"""
from __future__ import annotations

import pytest
import torch

from plait.launch import run_ranks
from plait.serve import QueueFull, Request, SamplingParams, Scheduler
from serve_models import reference_greedy, save_model

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

KINDS = ("llama", "qwen2", "gpt2")
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
PROMPTS = [[2, 5, 7, 9], [3, 4], [10, 11, 12, 13, 14, 15, 16]]
ARRIVALS = [0, 2, 2]         # iterations; with 2 slots, the last one waits for a slot
NEW = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {kind: save_model(kind, root / kind, seed=3) for kind in KINDS}


@pytest.fixture(scope="module")
def references(models):
    """transformers' greedy tokens of each prompt alone, per model."""
    return {kind: [reference_greedy(directory, p, NEW) for p in PROMPTS] for kind, directory in models.items()}


def _engine(directory, max_batch: int, record: bool = False):
    import plait
    from plait.serve import Engine

    model = plait.from_pretrained(directory, plait.current_mesh(), dtype=torch.float64)
    return Engine(model, max_batch=max_batch, record=record)


def _greedy_on_layout(rank: int, world: int, pp: int, tp: int, models: dict) -> dict:
    import plait

    plait.init_mesh(pp=pp, tp=tp)
    out = {}
    for kind, directory in models.items():
        engine = _engine(directory, max_batch=2)
        done = engine.generate(PROMPTS, [SamplingParams(max_tokens=NEW)] * len(PROMPTS), arrivals=ARRIVALS)
        out[kind] = [(c.token_ids, c.finish_reason) for c in done]
    plait.destroy_mesh()
    return out


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_greedy_equals_transformers(models, references, tp, pp):
    results = run_ranks(_greedy_on_layout, tp * pp, pp, tp, models, timeout=300)
    for kind, want in references.items():
        for rank, per_kind in enumerate(results):
            got = [tokens for tokens, _ in per_kind[kind]]
            assert got == want, f"{kind} tp={tp} pp={pp} rank {rank}: {got} != transformers' {want}"
            for tokens, reason in per_kind[kind]:
                assert reason == ("stop" if tokens[-1] == 1 else "length")


def _sampling(rank: int, world: int, pp: int, tp: int, directory: str) -> dict:
    import plait

    plait.init_mesh(pp=pp, tp=tp)
    params = [SamplingParams(max_tokens=8, temperature=t, top_k=k, top_p=p, seed=s, ignore_eos=True)
              for t, k, p, s in [(0.9, 0, 1.0, 11), (1.3, 5, 1.0, 12), (0.7, 0, 0.8, 13)]]
    engine = _engine(directory, max_batch=3, record=True)
    batched = [c.token_ids for c in engine.generate(PROMPTS, params, arrivals=[0, 1, 3])]
    # 8 tokens take 7 iterations (the prefill's iteration also decodes): 10 apart, each runs alone
    alone = [c.token_ids for c in engine.generate(PROMPTS, params, arrivals=[0, 10, 20])]
    received = engine.worker.received
    plait.destroy_mesh()
    return dict(batched=batched, alone=alone, received=received)


def test_seeded_sampling_repeatable_and_identical_across_ranks(models, references):
    # pp=2: the sampling rank (last stage) is not the leader that schedules
    results = [run_ranks(_sampling, 2, 2, 1, models["llama"], timeout=300) for _ in range(2)]
    first = results[0][0]
    assert first["batched"] == first["alone"], "a seeded request drew other tokens in a batch than alone"
    assert any(len(set(tokens)) > 2 for tokens in first["batched"]), "sampling drew almost nothing"
    assert first["batched"] != references["llama"]
    assert results[1][0]["batched"] == first["batched"], "a second run drew other tokens"
    assert results[0][1]["received"] == first["received"], "rank 1 received other tokens than rank 0"


def test_scheduler_refuses_and_bounds_queue():
    scheduler = Scheduler(max_batch=1, max_queue=1, max_len=8, vocab_size=37, block_size=4)
    with pytest.raises(ValueError, match="more than the context"):
        scheduler.submit(Request("long", list(range(9)), SamplingParams()))
    with pytest.raises(ValueError, match="empty"):
        scheduler.submit(Request("empty", [], SamplingParams()))
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        scheduler.submit(Request("oov", [40], SamplingParams()))
    scheduler.submit(Request("a", [1], SamplingParams()))
    scheduler.submit(Request("b", [1], SamplingParams()))      # one batch place + one queue place
    with pytest.raises(QueueFull):
        scheduler.submit(Request("c", [1], SamplingParams()))
    admitted = scheduler.admit()
    assert [r.rid for r in admitted] == ["a"] and [r.rid for r in scheduler.waiting] == ["b"]
    assert scheduler.pool.used == 1
    events = scheduler.cancel("a")
    assert events[0].finish_reason == "cancelled" and scheduler.pool.used == 0
    scheduler.waiting[0].deadline = 0.0
    events = scheduler.expire()
    assert events[0].rid == "b" and events[0].finish_reason == "deadline" and not scheduler.busy
    small = Scheduler(max_batch=2, max_queue=1, max_len=8, vocab_size=37, block_size=2, num_blocks=3)
    with pytest.raises(ValueError, match="needs 4 KV-cache blocks of 2 tokens, the cache has 3"):
        small.submit(Request("big", list(range(2, 9)), SamplingParams()))


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(top_k=-1), dict(max_tokens="3"), dict(seed=-1), dict(stop=[""])])
def test_sampling_params_refuse_bad_values(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
