"""overlap="fused" on CUDA: the symmetric-memory row reduction and the fused TP layers,
with 2 and 4 processes sharing one GPU (CUDA IPC works between processes on one device).

The fused layers must pass exactly the equivalence checks the "none" path passes
(tests/tp_reference.py, float32 with TF32 off). The reduction is checked bit for bit:
it adds in rank order in fp32 and rounds once.
"""
import pytest
import torch

from plait.launch import run_ranks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")]


def _ipc_comm(name: str, timeout_s=None):
    import torch.distributed as dist

    from plait.comm import Communicator

    dist.init_process_group("gloo")
    torch.cuda.set_device(0)
    return Communicator.create("ipc", None, name=name, timeout_s=timeout_s)


def _rank_rows(rank: int, rows: int, cols: int, dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(31 * rank + rows)
    return (torch.randn(rows, cols, generator=gen) * 3).to(dtype)


def reduce_rows_exact(rank: int, world: int) -> int:
    """Chunks published out of order, whole range and a middle range, every dtype: bitwise rank-order sums."""
    from plait.comm.symmetric import SymmetricMemory

    comm = _ipc_comm("symmetric", timeout_s=30)
    memory = SymmetricMemory(comm, 1 << 20)
    checks, epoch = 0, 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, cols, per, (lo, hi) in ((37, 24, 8, (0, 37)), (64, 7, 16, (16, 48)), (5, 8, 1, (2, 3))):
            epoch += 1
            mine = memory.data(rank, dtype, (rows, cols))
            mine.copy_(_rank_rows(rank, rows, cols, dtype).cuda())
            for chunk in reversed(range((rows + per - 1) // per)):
                memory.set_flag(rank, chunk, epoch)
            out = torch.full((hi - lo, cols), float("nan"), dtype=dtype, device="cuda")
            memory.reduce_rows(out, rows, (lo, hi), per, 0, epoch, blocks=3)
            torch.cuda.synchronize()
            memory.check("test")
            acc = sum(_rank_rows(r, rows, cols, dtype).float() for r in range(world))
            want = acc.to(dtype)[lo:hi]
            assert torch.equal(out.cpu(), want), f"{dtype} rows {rows} range {(lo, hi)}"
            comm.barrier()   # nobody overwrites a data area a peer still reads
            checks += 1
    return checks


def fused_peer_missing_times_out(rank: int, world: int) -> str:
    """A rank that skips a fused call leaves its peers' reduction waiting: it times out and the next call raises."""
    import plait
    from plait.errors import CommTimeoutError

    import torch.distributed as dist

    from plait.comm import Communicator

    warm = _ipc_comm("fused-warm-up", timeout_s=30)
    x = torch.randn(256, 16, device="cuda")
    plait.RowParallelLinear(16 * world, 32, overlap="fused", group=warm, device="cuda")(x)   # compiles the GEMM
    torch.cuda.synchronize()
    warm.barrier()
    comm = Communicator.create("ipc", None, name="fused-timeout", timeout_s=2.0)
    layer = plait.RowParallelLinear(16 * world, 32, overlap="fused", group=comm, device="cuda")
    layer(x)
    torch.cuda.synchronize()
    comm.barrier()

    outcome = "skipped"
    if rank == 0:
        layer(x)                       # rank 1 never joins this one
        torch.cuda.synchronize()
        try:
            layer(x)
            outcome = "no error"
        except CommTimeoutError as exc:
            outcome = str(exc)
    dist.barrier()                     # rank 1 keeps its buffer mapped until rank 0 is done with it
    return outcome


@pytest.mark.parametrize("world", [2, 4])
def test_reduce_rows_is_bitwise_rank_order_sum(world):
    assert run_ranks(reduce_rows_exact, world) == [9] * world


@pytest.mark.parametrize("world", [2, 4])
def test_fused_layers_match_dense(world):
    from tp_reference import fused_cases, run_fused_cases

    assert run_ranks(run_fused_cases, world) == [len(fused_cases(world))] * world


def test_fused_timeout_names_the_operation():
    message = run_ranks(fused_peer_missing_times_out, 2)[0]
    assert "fused row-parallel all-reduce" in message and "did not complete" in message, message
