"""Tensor-parallel layers over the shm communicator train exactly like the dense MLP.

The layers take any Communicator as ``group``; this runs the Column(GELU) -> Row MLP
with ``group=Communicator.create("shm", ...)`` against nn.Linear over SGD steps,
with and without sequence parallelism, in float64 and float32.
"""
import torch
import torch.nn.functional as F
from torch import nn

from plait.launch import run_ranks


def train_mlp_over_shm(rank: int, world: int) -> int:
    import torch.distributed as dist

    import plait
    from plait.comm import Communicator
    from tp_reference import block, close

    dist.init_process_group("gloo")
    comm = Communicator.create("shm", None, name="tp-shm")
    steps = 0
    for dtype, sp, overlap in ((torch.float64, False, "none"), (torch.float64, True, "chunked"),
                               (torch.float32, True, "none"), (torch.float32, False, "chunked")):
        torch.manual_seed(3)
        hidden, ffn = 16, 8 * world
        fc1, fc2 = nn.Linear(hidden, ffn, dtype=dtype), nn.Linear(ffn, hidden, dtype=dtype)
        col = plait.ColumnParallelLinear.from_linear(fc1, group=comm, activation="gelu", sequence_parallel=sp,
                                                     overlap=overlap)
        row = plait.RowParallelLinear.from_linear(fc2, group=comm, sequence_parallel=sp, overlap=overlap)
        assert col.comm is comm and row.comm is comm
        dense_opt = torch.optim.SGD([*fc1.parameters(), *fc2.parameters()], lr=0.1)
        par_opt = torch.optim.SGD([*col.parameters(), *row.parameters()], lr=0.1)
        gen = torch.Generator().manual_seed(11)
        for step in range(3):
            x = torch.randn(8 * world, 3, hidden, dtype=dtype, generator=gen)
            target = torch.randn(8 * world, 3, hidden, dtype=dtype, generator=gen)
            y = fc2(F.gelu(fc1(x)))
            loss = F.mse_loss(y, target)
            out = row(col(block(x, 0, rank, world) if sp else x))
            where = f"shm MLP step {step} {dtype} sp={sp} overlap={overlap}"
            close("output", out.detach(), (block(y, 0, rank, world) if sp else y).detach(), dtype, where)
            par_loss = F.mse_loss(out, block(target, 0, rank, world) if sp else target) / (world if sp else 1)
            for opt, value in ((dense_opt, loss), (par_opt, par_loss)):
                opt.zero_grad()
                value.backward()
                opt.step()
            close("fc1 weight", col.weight, block(fc1.weight, 0, rank, world), dtype, where)
            close("fc1 bias", col.bias, block(fc1.bias, 0, rank, world), dtype, where)
            close("fc2 weight", row.weight, block(fc2.weight, 1, rank, world), dtype, where)
            close("fc2 bias", row.bias, fc2.bias, dtype, where)
            steps += 1
    dist.destroy_process_group()
    return steps


def test_tp_mlp_over_shm_matches_dense():
    assert run_ranks(train_mlp_over_shm, 2) == [12, 12]
