"""Pipelined PP decode and per-request deadlines in plait.serve, in float64 against transformers.

At (tp, pp) in (1, 2), (2, 2), with more requests than stages, of different prompt lengths and
``max_tokens``, joining at different iterations:

- greedy tokens equal transformers' greedy ``generate`` of each prompt alone;
- the slot groups really overlap: the leader had ``pp`` groups in flight at once;
- step messages travel on control groups of their own (gloo), hidden states on the mesh's groups;
- ranks never diverge: every rank ran the same step messages (block tables and tokens), and the
  tokens the leader received are the ones the sampler chose;
- seeded sampling draws the same tokens batched as alone;
- a request with a deadline too short for its tokens ends with finish reason ``"deadline"``
  and frees its slot for the request waiting behind it.
"""
from __future__ import annotations

import pytest
import torch

from plait.launch import run_ranks
from plait.serve import SamplingParams
from serve_models import reference_greedy, save_model

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

PROMPTS = [[2, 5, 7, 9], [3, 4], [10, 11, 12, 13, 14, 15, 16], [8, 6, 4, 2], [17, 3, 20]]
MAX_TOKENS = [8, 5, 7, 6, 8]
ARRIVALS = [0, 1, 1, 3, 6]        # iterations; with 4 slots the last one waits for a free slot
SEEDED = [SamplingParams(max_tokens=6, temperature=t, top_k=k, top_p=p, seed=s, ignore_eos=True)
          for t, k, p, s in [(0.9, 0, 1.0, 21), (1.3, 5, 1.0, 22), (0.7, 0, 0.8, 23), (1.1, 0, 0.9, 24)]]
LATE = [2, 3]                     # the prompt of the request that runs out of time


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_model("llama", tmp_path_factory.mktemp("pipeline") / "llama", seed=3)


def _pipelined(rank: int, world: int, pp: int, tp: int, directory: str) -> dict:
    import torch.distributed as dist

    import plait
    from plait.serve import Engine

    plait.init_mesh(pp=pp, tp=tp)
    model = plait.from_pretrained(directory, plait.current_mesh(), dtype=torch.float64)
    engine = Engine(model, max_batch=4, record=True)
    greedy = engine.generate(PROMPTS, [SamplingParams(max_tokens=n) for n in MAX_TOKENS], arrivals=ARRIVALS)
    batched = engine.generate(PROMPTS[:4], SEEDED, arrivals=[0, 0, 1, 2])
    alone = engine.generate(PROMPTS[:4], SEEDED, arrivals=[0, 10, 20, 30])     # 6 tokens: 6 iterations each
    one_slot = Engine(model, max_batch=1)
    late = one_slot.generate([LATE, PROMPTS[0]], [SamplingParams(max_tokens=50, ignore_eos=True, timeout=1e-3),
                                                  SamplingParams(max_tokens=8)])
    worker = engine.worker
    split = (dist.get_backend(worker.control_line.group) == "gloo" and worker.hidden_line.group is model.mesh.pp_group
             and worker.control_line.group is not model.mesh.pp_group
             and worker.stage_comm.group is not model.mesh.tp_group)
    plait.destroy_mesh()
    return dict(split=split, greedy=[(c.token_ids, c.finish_reason) for c in greedy], flight=dict(engine.flight),
                batched=[c.token_ids for c in batched], alone=[c.token_ids for c in alone],
                late=[(c.token_ids, c.finish_reason, c.error) for c in late],
                steps=worker.steps, received=worker.received, leader=engine.is_leader,
                sampler=model.mesh.rank == worker.sampler)


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)])
def test_pipelined_decode(llama, tp, pp):
    results = run_ranks(_pipelined, tp * pp, pp, tp, llama, timeout=300)
    want = [reference_greedy(llama, p, n) for p, n in zip(PROMPTS, MAX_TOKENS)]
    for rank, result in enumerate(results):
        got = [tokens for tokens, _ in result["greedy"]]
        assert got == want, f"tp={tp} pp={pp} rank {rank}: {got} != transformers' {want}"
        assert [r for _, r in result["greedy"]] == ["stop" if t[-1] == 1 else "length" for t in want]

    assert all(r["split"] for r in results), "step messages must travel on their own (gloo) groups, hidden states " \
                                             "on the mesh's"
    leader = next(r for r in results if r["leader"])
    assert max(leader["flight"]) == pp, f"never {pp} groups in flight: {leader['flight']}"

    steps = results[0]["steps"]
    assert len(steps) > sum(MAX_TOKENS) // 4
    for rank, result in enumerate(results):
        assert result["steps"] == steps, f"rank {rank} ran other steps than rank 0"
    sampler = next(r for r in results if r["sampler"])
    assert leader["received"] == sampler["received"] and len(leader["received"]) == len(steps)

    assert leader["batched"] == leader["alone"], "a seeded request drew other tokens in a batch than alone"
    assert any(len(set(tokens)) > 2 for tokens in leader["batched"]), "sampling drew almost nothing"

    (late_tokens, late_reason, late_error), (tokens, reason, _) = leader["late"]
    assert late_reason == "deadline" and "deadline of 0.001 s" in late_error
    assert len(late_tokens) < 50
    assert tokens == reference_greedy(llama, PROMPTS[0], 8), "the request behind the late one got a bad slot"


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), "5", True])
def test_sampling_params_refuse_bad_timeout(bad):
    with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
        SamplingParams(timeout=bad)


def test_scheduler_deadline_from_params_frees_blocks():
    from plait.serve import Request, Scheduler

    scheduler = Scheduler(max_batch=1, max_queue=1, max_len=16, vocab_size=37, groups=2, block_size=4)
    late = Request("late", [2, 3], SamplingParams(timeout=0.5))
    scheduler.submit(late)
    assert late.deadline == pytest.approx(late.submitted + 0.5)
    capped = Request("capped", [2], SamplingParams(timeout=30.0), deadline=late.submitted + 1.0)
    scheduler.submit(capped)
    assert capped.deadline == late.submitted + 1.0          # the server's bound is the nearer one
    scheduler.admit()
    planned = scheduler.plan(0)
    assert [r.rid for r in planned.requests] == ["late"] and scheduler.plan(1) is None
    [event] = scheduler.expire(now=late.submitted + 0.6)
    assert event.rid == "late" and event.finish_reason == "deadline" and "0.5 s" in event.error
    assert scheduler.pool.used == 0 and scheduler.admit() == [capped]


def test_new_requests_go_to_the_emptiest_group():
    from plait.serve import Request, Scheduler

    scheduler = Scheduler(max_batch=8, max_queue=8, max_len=16, vocab_size=37, groups=2, block_size=4)
    for i in range(7):
        scheduler.submit(Request(str(i), [2, i], SamplingParams()))
    assert [r.group for r in scheduler.admit()] == [0, 1, 0, 1, 0, 1, 0]
    for rid in ("0", "2", "4"):                      # group 0 keeps 6; group 1 keeps 1, 3, 5
        scheduler.cancel(rid)
    scheduler.submit(Request("new", [2, 9], SamplingParams()))
    [new] = scheduler.admit()
    assert new.group == 0, "group 0 has one request against three"
    assert sorted(r.rid for r in scheduler.plan(0).requests) == ["6", "new"]


def _stage_silent(rank: int, world: int, directory: str) -> str:
    import os
    import time

    import plait
    from plait.serve import Engine

    plait.init_mesh(pp=2)
    engine = Engine(plait.from_pretrained(directory, plait.current_mesh(), dtype=torch.float64), max_batch=2)
    os.environ["PLAIT_TIMEOUT_S"] = "3"       # only now: loading may be slow on a busy machine
    if rank == 1:
        time.sleep(8)                         # the last stage never follows: its peer must not wait forever
        return ""
    try:
        engine.generate(PROMPTS[:2], [SamplingParams(max_tokens=4)] * 2)
    except Exception as err:                  # noqa: BLE001 - the error itself is what the test checks
        return f"{type(err).__name__}: {err}"
    return "no error"


def test_silent_stage_fails_with_a_message_not_a_hang(llama):
    [message, _] = run_ranks(_stage_silent, 2, llama, timeout=120)
    assert message.startswith("CommTimeoutError"), message
    assert "rank 0 of group 'serve-pp'" in message and "did not complete within 3 s" in message, message
