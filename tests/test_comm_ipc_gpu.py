"""The ipc communicator on CUDA: 2 and 4 processes sharing one GPU (CUDA IPC works between
processes on one device, where NCCL refuses two ranks), against exact expectations.

Inputs are made on the CPU from seeds, so every rank knows every rank's input and the
exact expected result: reductions add in rank order in fp32 and round once, which the
kernels promise bit for bit. The rank functions take the backend and device, so the
same checks also describe what the shm backend does on CPU.

``PLAIT_GPU_TEST_SIZES=small`` (set by scripts/gpu_check.py for compute-sanitizer, which
slows every kernel many times over) keeps one message of each kind that spans several
chunks of the data areas and drops the other large ones.
"""
import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plait.launch import run_ranks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMALL = os.environ.get("PLAIT_GPU_TEST_SIZES") == "small"
# all_reduce counts (the largest spans chunks of the 8 MiB data area: 4 B elements past 2 Mi),
# all_gather rows of 300,000 or 30,000, send/recv counts (the largest spans 4 MiB inbox chunks),
# back-to-back all_reduces
COUNTS = (1, 7, 4097, 2_097_153) if SMALL else (1, 7, 4097, 1_000_003, 3_000_001)
GATHER_COLS = 30_000 if SMALL else 300_000
SEND_COUNTS = (0, 1, 1_100_000) if SMALL else (0, 1, 5_000_000)
BACK_TO_BACK = 50 if SMALL else 1000
OPS = ("sum", "max", "min", "avg")
GATHER_DTYPES = (torch.float32, torch.bfloat16, torch.int64)


def _gather_shapes(world: int) -> tuple:
    return (5,), (world * 3, 7), (2, world * 2, 3), (world * 8, GATHER_COLS)


# one check per all_reduce (count, dtype, op) and per all_gather (shape, dtype, dim)
CHECKS = len(COUNTS) * len(DTYPES) * len(OPS) + len(GATHER_DTYPES) * sum(len(shape) for shape in _gather_shapes(1))
VIEW = {4: torch.int32, 2: torch.int16, 8: torch.int64, 1: torch.uint8}


def _data(rank: int, shape, dtype, salt: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7919 * salt + rank)
    if not dtype.is_floating_point:
        return torch.randint(-100, 100, shape, generator=gen).to(dtype)
    return (torch.randn(shape, generator=gen) * 4).to(dtype)


def _expected(inputs, op: str) -> torch.Tensor:
    acc = inputs[0].float()
    for x in inputs[1:]:
        x = x.float()
        acc = acc + x if op in ("sum", "avg") else (torch.maximum(acc, x) if op == "max" else torch.minimum(acc, x))
    return (acc / len(inputs) if op == "avg" else acc).to(inputs[0].dtype)


def _same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got = got.cpu()
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.dtype}{list(got.shape)}"
    view = VIEW[got.element_size()]
    assert torch.equal(got.contiguous().view(view), want.contiguous().view(view)), f"{what}: values differ"


def _on(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A copy of t on dev (a copy on CPU too: the operations work in place)."""
    return t.clone().to(dev)


def _setup(backend: str, device: str, name: str):
    import torch.distributed as dist

    from plait.comm import Communicator

    dist.init_process_group("gloo")
    if device == "cuda":
        torch.cuda.set_device(0)  # every rank on the one GPU
    return Communicator.create(backend, None, name=name), torch.device(device, 0) if device == "cuda" else \
        torch.device("cpu")


def everything(rank: int, world: int, backend: str = "ipc", device: str = "cuda") -> int:
    import torch.distributed as dist

    comm, dev = _setup(backend, device, "node")
    checks = 0
    for count in COUNTS:
        for dtype in DTYPES:
            for op in OPS:
                inputs = [_data(r, (count,), dtype, checks) for r in range(world)]
                got = comm.all_reduce(_on(inputs[rank], dev), op=op)
                _same(got, _expected(inputs, op), f"all_reduce {count} {dtype} {op}")
                checks += 1
    storage = [_data(r, (5000,), torch.bfloat16, 1) for r in range(world)]
    mine = _on(storage[rank], dev)[1:]  # 2-byte aligned
    comm.all_reduce(mine)
    _same(mine, _expected([s[1:] for s in storage], "sum"), "all_reduce misaligned")
    inputs = [_data(r, (33, 10), torch.float32, 2) for r in range(world)]
    mine = _on(inputs[rank], dev).t()
    comm.all_reduce(mine)
    _same(mine, _expected(inputs, "sum").t(), "all_reduce transposed")
    for shape in _gather_shapes(world):
        for dtype in GATHER_DTYPES:
            inputs = [_data(r, shape, dtype, 3 + checks) for r in range(world)]
            for dim in range(len(shape)):
                _same(comm.all_gather(inputs[rank].to(dev), dim=dim), torch.cat(inputs, dim=dim), f"all_gather {shape}")
                if dtype != torch.int64 and shape[dim] % world == 0:
                    got = comm.reduce_scatter(inputs[rank].to(dev), dim=dim)
                    _same(got, _expected(inputs, "sum").chunk(world, dim=dim)[rank], f"reduce_scatter {shape} {dim}")
                checks += 1
            src = checks % world
            _same(comm.broadcast(_on(inputs[rank], dev), src=src), inputs[src], f"broadcast {shape}")
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    for numel in SEND_COUNTS:
        inbox = torch.full((numel,), -1.0, device=dev)
        handles = [comm.send(torch.arange(numel, device=dev, dtype=torch.float32) + rank, dst=nxt, async_op=True),
                   comm.recv(inbox, src=prv, async_op=True)]
        for h in handles:
            h.wait()
        _same(inbox, torch.arange(numel, dtype=torch.float32) + prv, f"send/recv {numel}")
    results = [comm.all_reduce(torch.full((16,), float(rank + i), device=dev)) for i in range(BACK_TO_BACK)]
    want = torch.stack([torch.full((16,), float(world * i + world * (world - 1) // 2)) for i in range(BACK_TO_BACK)])
    _same(torch.stack(results), want, f"{BACK_TO_BACK} back-to-back all_reduces")
    if backend == "ipc":  # GPU flags: rank 0 signals every peer, each waits for it
        if rank == 0:
            for peer in range(1, world):
                comm.set_flag(peer, 3, 7)
        else:
            comm.wait_flag(3, 7)
        comm.synchronize()
    comm.barrier()
    dist.destroy_process_group()
    return checks


@pytest.mark.parametrize("world", [2, 4])
def test_ipc_every_operation_exact(world):
    assert run_ranks(everything, world, timeout=600) == [CHECKS] * world


def mlp(rank: int, world: int, backend: str = "ipc", device: str = "cuda") -> float:
    import torch.distributed as dist

    import plait
    from tp_reference import block, close

    comm, dev = _setup(backend, device, "tp")
    torch.manual_seed(3)
    fc1, fc2 = nn.Linear(32, 16 * world, device=dev), nn.Linear(16 * world, 32, device=dev)
    col = plait.ColumnParallelLinear.from_linear(fc1, group=comm, activation="gelu", sequence_parallel=True)
    row = plait.RowParallelLinear.from_linear(fc2, group=comm, sequence_parallel=True)
    x = torch.randn(8 * world, 2, 32, generator=torch.Generator().manual_seed(5)).to(dev)
    y = fc2(F.gelu(fc1(x)))
    out = row(col(block(x, 0, rank, world)))
    close("output", out.detach(), block(y, 0, rank, world).detach(), torch.float32, f"{backend} MLP")
    out.sum().backward()
    y.sum().backward()
    close("fc1 weight grad", col.weight.grad, block(fc1.weight.grad, 0, rank, world), torch.float32, "MLP")
    dist.destroy_process_group()
    return float(out.detach().sum())


def test_ipc_tp_mlp_matches_dense():
    run_ranks(mlp, 2, timeout=300)


def peer_skips(rank: int, world: int) -> str:
    import torch.distributed as dist

    from plait.errors import CommTimeoutError

    comm, dev = _setup("ipc", "cuda", "node")
    comm._timeout_s = 2.0
    if rank == 1:
        time.sleep(8)  # never joins; rank 0's kernel must give up by itself
        return ""
    start = time.monotonic()
    comm.all_reduce(torch.ones(1024, device=dev))
    try:
        comm.synchronize()
    except CommTimeoutError as exc:
        elapsed = time.monotonic() - start
        assert elapsed < 5, f"the GPU wait took {elapsed:.1f} s for a 2 s bound"
        message = str(exc)
    else:
        raise AssertionError("all_reduce completed without rank 1")
    dist.destroy_process_group()
    return message


def test_ipc_missing_peer_times_out_on_the_gpu():
    message = run_ranks(peer_skips, 2, timeout=120)[0]
    assert "rank 0 of group 'node'" in message and "all_reduce timed out on the GPU" in message
    assert "group rank 1 to arrive" in message and "2 s" in message


def auto_on_cuda(rank: int, world: int) -> list[str]:
    import torch.distributed as dist

    comm, dev = _setup("auto", "cuda", "tp")
    small, large = torch.ones(1000, device=dev), torch.ones(3 << 20, device=dev)  # 4 KB, 12 MB
    routes = [type(comm.backend_for(small, "all_reduce")).backend, type(comm.backend_for(large, "all_reduce")).backend]
    assert torch.equal(comm.all_reduce(small).cpu(), torch.full((1000,), float(world)))
    assert torch.equal(comm.all_reduce(large).cpu(), torch.full((3 << 20,), float(world)))
    dist.destroy_process_group()
    return routes


def test_auto_sends_small_cuda_messages_through_ipc():
    assert run_ranks(auto_on_cuda, 2, timeout=300)[0] == ["ipc", "torch"]
