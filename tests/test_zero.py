"""ZeRO-1 (plait.dp.ShardedOptimizer): sharded optimizer state gives the one-process results.

Two levels. A small MLP on 3 DP ranks (sizes not divisible by 3: padding) over
the torch (gloo) and shm communicators, checked after every step against one
process with the plain torch optimizer, state included. Then plait's GPT through
plait.train (``zero: 1``, default communicators: shm on this CPU host) on (dp, pp, tp) =
(2, 1, 1) and (2, 2, 2), with and without clipping, against the one-process run, as
tests/test_3d.py checks the other layouts (same bounds, why in tests/gpt_jobs.py).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt_jobs import assert_same_run, job_dict, run_jobs
from plait.launch import run_ranks


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 13), nn.GELU(), nn.Linear(13, 5), nn.GELU(), nn.Linear(5, 3)).double()


def mlp_zero(comm, optimizer: str, clip: float) -> dict:
    """3 steps (2 microbatches each) of ZeRO-1 and of one process side by side, then a state round trip."""
    from plait.dp import ShardedOptimizer, optimizer_state_bytes

    rank, world = comm.rank, comm.size
    cls, kwargs = {"adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
                   "sgd": (torch.optim.SGD, dict(lr=1e-1, momentum=0.9))}[optimizer]
    model, reference = _mlp(0), _mlp(0)
    zero = ShardedOptimizer(model.parameters(), cls, comm, bucket_mb=300 / 2**20, **kwargs)  # ~300 B buckets
    ref_opt = cls(reference.parameters(), **kwargs)
    gen = torch.Generator().manual_seed(5)
    overlapped, norms = [], []
    for _ in range(3):
        x = torch.randn(4 * world, 6, generator=gen, dtype=torch.float64)
        y = torch.randn(4 * world, 3, generator=gen, dtype=torch.float64)
        ref_opt.zero_grad()
        F.mse_loss(reference(x), y).backward()
        want_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip) if clip else None
        ref_opt.step()
        zero.start_step(2)
        for xm, ym in zip(x.chunk(world)[rank].chunk(2), y.chunk(world)[rank].chunk(2)):
            (F.mse_loss(model(xm), ym) / 2).backward()
        overlapped.append(zero.started_before_backward_ended())
        zero.finish()
        if clip:
            norm = zero.clip_grad_norm_(clip)
            torch.testing.assert_close(norm, want_norm, rtol=1e-10, atol=0)
            norms.append(float(norm))
        zero.step()
        zero.zero_grad()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    gathered = zero.gather_state()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert gathered[p].keys() == ref_opt.state[q].keys()
        for key, value in ref_opt.state[q].items():
            torch.testing.assert_close(gathered[p][key], value, rtol=1e-10, atol=1e-15)
    # load the plain optimizer's state and take one more step on both: still equal
    zero.load_state({p: ref_opt.state[q] for p, q in zip(model.parameters(), reference.parameters())})
    ref_opt.zero_grad()
    F.mse_loss(reference(x), y).backward()
    ref_opt.step()
    zero.start_step(1)
    F.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
    zero.finish()
    zero.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    result = dict(buckets=len(zero.buckets), padded=sum(b.padding for b in zero.buckets), overlapped=overlapped,
                  bytes=optimizer_state_bytes(zero), full_bytes=optimizer_state_bytes(ref_opt), norms=norms)
    return result


CASES = [("torch", "adamw", 0.0), ("torch", "sgd", 0.05), ("shm", "adamw", 0.05)]


def mlp_cases(rank: int, world: int, shm: bool) -> dict:
    """Every case of CASES (shm ones only if ``shm``) and the misuse checks, in one set of processes."""
    import torch.distributed as dist

    from plait.comm import Communicator

    dist.init_process_group("gloo")
    comms = {"torch": Communicator.create("torch", None, name="dp")}
    if shm:
        comms["shm"] = Communicator.create("shm", None, name="dp-shm")
    results = {case: mlp_zero(comms[case[0]], *case[1:]) for case in CASES if case[0] in comms}
    misuse(comms["torch"])
    if shm:
        comms["shm"].close()
    dist.destroy_process_group()
    return results


def test_sharded_optimizer_matches_one_process_and_refuses_misuse():
    """3 DP ranks: torch (gloo) and shm communicators, AdamW and SGD with momentum, clipping, padding."""
    from plait.comm import available_backends

    shm, why = available_backends()["shm"]
    results = run_ranks(mlp_cases, 3, shm)
    for case in CASES:
        if case[0] == "shm" and not shm:
            print(f"shm case skipped: {why}")
            continue
        _, optimizer, clip = case
        for r in (by_rank[case] for by_rank in results):
            assert r["buckets"] > 2 and r["padded"] > 0, f"{case}: want several buckets, some padded"
            assert all(r["overlapped"]), f"{case}: the first reduce-scatter should start before backward ends"
            # a third of the moments, plus at most 2 padding elements per bucket and the scalar steps
            per_element = 2 * 8 if optimizer == "adamw" else 8
            assert r["bytes"] <= r["full_bytes"] / 3 + per_element * 2 * r["buckets"] + 8 * r["buckets"], case
            if clip:
                assert all(n > clip for n in r["norms"]), f"{case}: the clip should be active"


def misuse(comm) -> None:
    from plait.dp import ShardedOptimizer

    rank = comm.rank
    model = _mlp(0)
    cases = [(lambda: ShardedOptimizer(model.parameters(), torch.optim.LBFGS, comm), "pass elementwise=True"),
             (lambda: ShardedOptimizer(model.parameters(), torch.optim.AdamW(model.parameters()), comm),
              "optimizer class"),
             (lambda: ShardedOptimizer(model.parameters(), torch.optim.AdamW, None), "DP Communicator"),
             (lambda: ShardedOptimizer([{"params": model.parameters()}], torch.optim.AdamW, comm), "parameter groups"),
             (lambda: ShardedOptimizer([], torch.optim.AdamW, comm), "at least one parameter"),
             (lambda: ShardedOptimizer([model[0].weight] * 2, torch.optim.AdamW, comm), "appears twice"),
             # rank 1 has a different model: the bucket check names the disagreement on every rank
             (lambda: ShardedOptimizer((_mlp(0) if rank == 0 else nn.Linear(3, 3).double()).parameters(),
                                       torch.optim.AdamW, comm), "disagree on the gradient buckets")]
    for make, text in cases:
        with pytest.raises(ValueError, match=text):
            make()
    zero = ShardedOptimizer(model.parameters(), torch.optim.AdamW, comm)
    with pytest.raises(RuntimeError, match="finish"):
        zero.step()
    with pytest.raises(ValueError, match="max_norm"):
        zero.clip_grad_norm_(0.0)
    with pytest.raises(ValueError, match="have no optimizer state"):
        zero.load_state({model[0].weight: {"step": torch.tensor(1.0)}})


# ------------------------------------------------------------------ the GPT, through plait.train
CLIP = 0.5  # below the norms of these 3 steps (about 1 to 2), so clipping changes every update
GPT_CASES = [(2, 1, 1, 1, 0.0), (2, 2, 2, 1, CLIP), (2, 2, 2, 0, CLIP)]   # dp, pp, tp, zero, clip


@pytest.fixture(scope="module")
def gpt_runs(tmp_path_factory):
    """The one-process runs (without and with clipping) and every case's, each rank's outcome, by key."""
    pytest.importorskip("safetensors")
    root = tmp_path_factory.mktemp("zero")

    def spec(dp=1, pp=1, tp=1, zero=0, clip=0.0):
        return job_dict(dp=dp, pp=pp, tp=tp, zero=zero, clip_grad=clip, save=str(root / f"{dp}{pp}{tp}-{zero}-{clip}"))

    one = run_ranks(run_jobs, 1, [spec(), spec(clip=CLIP)])[0]
    out = {("one", 0.0): one[:1], ("one", CLIP): one[1:]}
    two = [case for case in GPT_CASES if case[0] * case[1] * case[2] == 2]
    eight = [case for case in GPT_CASES if case[0] * case[1] * case[2] == 8]
    for cases, world in ((two, 2), (eight, 8)):
        results = run_ranks(run_jobs, world, [spec(*case) for case in cases], timeout=300)
        out.update({case: [r[i] for r in results] for i, case in enumerate(cases)})
    return out


@pytest.mark.parametrize("dp,pp,tp,zero,clip", GPT_CASES)
def test_gpt_with_zero1_or_clipping_matches_one_process(dp, pp, tp, zero, clip, gpt_runs):
    (reference,) = gpt_runs[("one", clip)]
    ranks = gpt_runs[(dp, pp, tp, zero, clip)]
    where = f"zero={zero} (dp, pp, tp)=({dp}, {pp}, {tp}) clip={clip}"
    for outcome in ranks:
        assert_same_run(outcome, reference, where)
        assert all(outcome["overlapped"]), f"{where}: the reduce-scatter should start before backward ends"
        if clip:
            assert min(outcome["norms"]) > clip, f"{where}: the clip should be active"
    # every rank holds about 1/(dp*pp*tp) of the one-process AdamW state with ZeRO-1 (TP/PP split it,
    # ZeRO the rest), 1/(pp*tp) without (each DP replica holds it all)
    replicas = 1 if zero else dp
    ref_bytes = reference["state_bytes"]
    total = sum(r["state_bytes"] for r in ranks)
    assert total <= replicas * ref_bytes * 1.05, f"{where}: {total} state bytes over all ranks vs {ref_bytes} in one process"
    assert max(r["state_bytes"] for r in ranks) <= replicas * ref_bytes / (dp * pp * tp) * 1.5, where


def test_trainjob_zero_option_is_checked():
    from plait.train import TrainJob

    for bad, text in ((2, "zero must be one of"), (3, "zero must be one of"), (-1, "zero must be one of"),
                      (True, "zero must be an int"), ("1", "zero must be an int")):
        with pytest.raises(ValueError, match=text):
            TrainJob.from_dict(job_dict(dp=2, zero=bad))
    with pytest.raises(ValueError, match="clip_grad"):
        TrainJob.from_dict(job_dict(clip_grad=-1.0))
