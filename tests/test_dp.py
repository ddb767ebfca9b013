"""GradReducer: bucketed DP mean of gradients equals one-process training; overlap is real."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plait.launch import run_ranks


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4)).double()


def dp_training(rank: int, world: int, microbatches: int, bucket_mb: float) -> dict:
    import plait
    from plait.dp import GradReducer

    mesh = plait.init_mesh(dp=world)
    model, reference = _model(0), _model(0)
    reducer = GradReducer(model.parameters(), mesh.dp_comm, bucket_mb=bucket_mb)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(7)
    overlapped, quiet_before_last = [], []
    for step in range(3):
        x = torch.randn(8 * world, 12, generator=gen, dtype=torch.float64)
        y = torch.randn(8 * world, 4, generator=gen, dtype=torch.float64)
        # one process, whole batch
        ref_opt.zero_grad()
        F.mse_loss(reference(x), y).backward()
        ref_opt.step()
        # DP: this rank's shard, in microbatches; loss scaled so grads are the local mean
        reducer.start_step(microbatches)
        xs, ys = x.chunk(world)[rank].chunk(microbatches), y.chunk(world)[rank].chunk(microbatches)
        for i, (xm, ym) in enumerate(zip(xs, ys)):
            if i == microbatches - 1:
                quiet_before_last.append(not any(kind == "launch" for _, kind, _ in reducer.timeline))
            (F.mse_loss(model(xm), ym) / microbatches).backward()
        overlapped.append(reducer.started_before_backward_ended())
        reducer.finish()
        opt.step()
        reducer.zero_grad()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)
    plait.destroy_mesh()
    return dict(buckets=len(reducer.buckets), overlapped=overlapped, quiet=quiet_before_last)


@pytest.mark.parametrize("microbatches", [1, 2])
def test_dp_matches_one_process_and_overlaps(microbatches):
    results = run_ranks(dp_training, 2, microbatches, 0.001)  # ~1 KB buckets: several of them
    for r in results:
        assert r["buckets"] > 2
        assert all(r["overlapped"]), "the first bucket should launch before backward ends"
        assert all(r["quiet"]), "no reduction may start before the last microbatch's backward"


def test_dp_single_bucket_and_bad_arguments():
    results = run_ranks(dp_training, 2, 2, 25.0)
    assert results[0]["buckets"] == 1
    from plait.dp import build_buckets

    with pytest.raises(ValueError, match="positive"):
        build_buckets([nn.Parameter(torch.ones(2))], 0)
