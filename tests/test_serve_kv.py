"""The paged KV cache, prefix caching, chunked prefill and preemption of plait.serve, against transformers.

Engine runs (float64, Llama with GQA) at (tp, pp) in (1,1), (2,1), (2,2), blocks of 4 positions, a
step budget of 6 tokens, requests sharing a 20-token system prompt and arriving while others decode:

- greedy tokens equal transformers' ``generate`` of each prompt alone, also for a request with a
  repetition penalty whose prompt comes from the prefix cache (the sampler gets the cached tokens),
  whether a step runs its chunks and decodes as two padded batches or as one of one-token rows;
- prompts are read from the prefix cache (the scheduler counts the hits), long prompts are fed in
  chunks in the same steps as other requests' decodes, no step feeds more than the budget, and every
  rank ran the same steps (block tables included);
- with a cache too small for every request, requests are preempted and readmitted, and still give
  transformers' tokens.

Unit tests: the block pool (reference counts, LRU eviction, hash chains), admission by free blocks, a
burst sharing a prefix computes it once, and the cache's bytes per position equal transformers' own
KV cache per token.
"""
from __future__ import annotations

import random

import pytest
import torch

from plait.launch import run_ranks
from plait.serve import Request, SamplingParams, Scheduler
from serve_models import reference_greedy, save_model

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

NEW = 8
BLOCK = 4
BUDGET = 6
_rng = random.Random(11)
SYSTEM = [_rng.randrange(2, 37) for _ in range(20)]
PROMPTS = [SYSTEM + [3, 4, 5], SYSTEM + [6, 7], SYSTEM[:9] + [8, 9, 10], [_rng.randrange(2, 37) for _ in range(30)],
           SYSTEM + [3, 4, 5], SYSTEM + [11]]
ARRIVALS = [0, 0, 1, 3, 8, 12]
PENALIZED = 5                      # index of the request with a repetition penalty
DISTINCT = [[_rng.randrange(2, 37) for _ in range(18 + i)] for i in range(3)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_model("llama", tmp_path_factory.mktemp("kv") / "llama", seed=3)


def _params(i: int) -> SamplingParams:
    if i == PENALIZED:
        return SamplingParams(max_tokens=NEW, repetition_penalty=1.5)
    return SamplingParams(max_tokens=NEW)


def _run(rank: int, world: int, pp: int, tp: int, directory: str) -> dict:
    import plait
    from plait.serve import Engine

    from plait.serve import batch

    plait.init_mesh(pp=pp, tp=tp)
    model = plait.from_pretrained(directory, plait.current_mesh(), dtype=torch.float64)
    params = [_params(i) for i in range(len(PROMPTS))]
    batch.SPLIT_TOKENS = 0                    # chunks and decodes as two padded batches per step
    parts = Engine(model, max_batch=3, block_size=BLOCK, max_step_tokens=BUDGET)
    two_parts = [c.token_ids for c in parts.generate(PROMPTS, params, arrivals=ARRIVALS)]
    batch.SPLIT_TOKENS = BUDGET               # short chunks as one-token rows beside the decodes: one batch
    shared = Engine(model, max_batch=3, block_size=BLOCK, max_step_tokens=BUDGET, record=True)
    done = shared.generate(PROMPTS, params, arrivals=ARRIVALS)
    tight = Engine(model, max_batch=3, block_size=BLOCK, max_step_tokens=BUDGET, kv_blocks=12)
    squeezed = tight.generate(DISTINCT, [SamplingParams(max_tokens=NEW, ignore_eos=True)] * 3)
    plait.destroy_mesh()
    return dict(tokens=[c.token_ids for c in done], two_parts=two_parts, steps=shared.worker.steps, leader=shared.is_leader,
                hits=shared.scheduler.cache_hits, squeezed=[c.token_ids for c in squeezed],
                preemptions=tight.scheduler.preemptions, used=shared.scheduler.pool.used)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (2, 2)])
def test_paged_prefix_cached_chunked_equals_transformers(llama, tp, pp):
    import transformers as T

    want = [reference_greedy(llama, p, NEW) for p in PROMPTS]
    model = T.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float64)
    prompt = PROMPTS[PENALIZED]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, repetition_penalty=1.5,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    want[PENALIZED] = out[0, len(prompt):].tolist()
    want_squeezed = [reference_greedy(llama, p, NEW, stop_at_eos=False) for p in DISTINCT]

    results = run_ranks(_run, tp * pp, pp, tp, llama, timeout=600)
    for rank, result in enumerate(results):
        assert result["tokens"] == want, f"tp={tp} pp={pp} rank {rank}: {result['tokens']} != {want}"
        assert result["two_parts"] == want, f"tp={tp} pp={pp} rank {rank}, steps in two parts: differ"
        assert result["steps"] == results[0]["steps"], f"rank {rank} ran other steps than rank 0"
    leader = next(r for r in results if r["leader"])
    assert leader["hits"] >= 20 + 20 + 8 + 20, f"prefix cache hits {leader['hits']}"
    assert leader["used"] == 0, "blocks still held after every request ended"
    mixed = chunked = 0
    for tables, rows in leader["steps"]:
        assert sum(len(r) for r in rows) <= BUDGET
        lengths = [len(r) for r in rows]
        mixed += max(lengths) > 1 and min(lengths) == 1
        chunked += max(lengths) == BUDGET
    assert mixed and chunked, "no prompt chunk ran beside a decode"
    for rank, result in enumerate(results):
        assert result["squeezed"] == want_squeezed, f"tp={tp} pp={pp} rank {rank}: preempted requests differ"
    assert leader["preemptions"] > 0, "the small cache never preempted"


def test_block_pool_counts_references_and_evicts_least_recent():
    from plait.serve.blocks import BlockPool, block_keys

    pool = BlockPool(num_blocks=4, block_size=2)
    keys = block_keys([5, 6, 7, 8, 9], 2)
    assert len(keys) == 2 and keys == block_keys([5, 6, 7, 8], 2)
    assert block_keys([1, 6, 7, 8], 2)[1] != keys[1], "a block's key must depend on every token before it"
    a = pool.allocate(2)
    for block, key in zip(a, keys):
        pool.register(block, key)
    b = pool.match(keys)
    assert b == a and [pool.refs[x] for x in a] == [2, 2]
    pool.release(a)
    pool.release(b)
    assert pool.available == 4 and list(pool.idle) == a            # cached, no holder
    fresh = pool.allocate(2)
    assert not set(fresh) & set(a), "fresh blocks go before cached ones"
    pool.allocate(1)                                                 # evicts the least recently released
    assert pool.match(keys) == [] and pool.is_cached(keys[1])
    with pytest.raises(ValueError, match="not held"):
        pool.release([a[1]])                                         # cached, but nobody holds it


def _scheduler(**kw) -> Scheduler:
    return Scheduler(max_queue=8, max_len=64, vocab_size=37, block_size=BLOCK, **kw)


def test_admission_waits_for_free_blocks():
    scheduler = _scheduler(max_batch=4, num_blocks=5)
    scheduler.submit(Request("a", list(range(2, 14)), SamplingParams()))      # 12 tokens: 3 blocks
    scheduler.submit(Request("b", list(range(14, 26)), SamplingParams()))
    assert [r.rid for r in scheduler.admit()] == ["a"] and [r.rid for r in scheduler.waiting] == ["b"]
    scheduler.cancel("a")
    assert [r.rid for r in scheduler.admit()] == ["b"]


def test_a_burst_sharing_a_prefix_computes_it_once():
    scheduler = _scheduler(max_batch=4, max_step_tokens=64)
    for i in range(3):
        scheduler.submit(Request(str(i), SYSTEM + [3 + i], SamplingParams()))
    assert [r.rid for r in scheduler.admit()] == ["0"], "the others must wait for the shared blocks"
    first = scheduler.plan()
    assert first.batch.tokens.numel() == 21
    assert [r.rid for r in scheduler.admit()] == ["1", "2"]
    second = scheduler.plan()
    assert second.batch.column("length").tolist() == [1, 1], "each follower computes only its last token"
    assert scheduler.cache_hits == 40


def test_cache_bytes_per_position_equal_transformers_kv_per_token(llama):
    import transformers as T

    import plait
    from plait.serve.worker import cache_bytes_per_token

    model = T.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float64)
    with torch.no_grad():
        cache = model(torch.tensor([list(range(2, 12))]), use_cache=True).past_key_values
    per_token = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)) // 10
    plait.init_mesh()
    try:
        ours = plait.from_pretrained(llama, plait.current_mesh(), dtype=torch.float64)
        assert cache_bytes_per_token(ours) == per_token
    finally:
        plait.destroy_mesh()


def test_a_step_runs_as_one_batch_or_two():
    from plait.serve.batch import SPLIT_TOKENS, Row, StepBatch

    def step(lengths: list[int]) -> StepBatch:
        return StepBatch.build([Row([i, 9], 10 * i, list(range(2, 2 + n)), i, 40, True, SamplingParams(seed=0), 0, [])
                                for i, n in enumerate(lengths)])

    [part] = step([1, 3, 1]).parts()                      # short chunk: every token a one-token row
    assert part.rows.tolist() == [0, 1, 1, 1, 2] and part.tokens.shape == (5, 1)
    assert part.starts.tolist() == [0, 10, 11, 12, 20] and part.keep.tolist() == [True, False, False, True, True]
    assert part.tables.tolist() == [[0, 9], [1, 9], [1, 9], [1, 9], [2, 9]]
    chunk, decode = step([1, SPLIT_TOKENS + 1, 4]).parts()
    assert chunk.rows.tolist() == [1, 2] and chunk.tokens.shape == (2, SPLIT_TOKENS + 1)
    assert chunk.tokens[1].tolist() == [2, 3, 4, 5] + [0] * (SPLIT_TOKENS - 3)
    assert decode.rows.tolist() == [0] and decode.keep.all()
