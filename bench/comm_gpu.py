"""GPU communication: plait's IPC all-reduce, and what its kernels cost a GEMM running beside them.

    python bench/comm_gpu.py [--world 2 4] [--min-kb 1] [--max-mb 64] [--gemm 8192 8192 8192]
    plait bench comm_gpu ...

1. All-reduce latency and bus bandwidth (``2 (n-1)/n * bytes / time``) from ``--min-kb`` to
   ``--max-mb``, bf16, for each ``--world``: plait's ``ipc`` backend, and NCCL when every rank
   has its own GPU. With fewer GPUs than ranks the ranks share GPU 0 (CUDA IPC allows it,
   NCCL does not) and the rows say "shared GPU": those figures measure the protocol and the
   kernels under time-slicing, not a link.
2. GEMM beside the comm kernel, in one process: a bf16 ``torch.matmul`` of ``--gemm`` M N K
   timed alone, then while the fused path's row reduction (``SymmetricMemory.reduce_rows``
   with ``plait.tp.fused.REDUCE_BLOCKS`` thread blocks, its flags already raised) runs
   back to back on a side stream. The ratio is the GEMM's throughput kept (target >= 0.9):
   the cost of the SMs and memory bandwidth the comm kernel takes.

Times are CUDA-event medians over ``--iters`` after ``--warmup``. Results go to
bench/results/comm_gpu-*.json (needs a CUDA GPU; exits with a message otherwise).
"""
from __future__ import annotations

import statistics
import sys

import torch

from plait.bench.common import bench_parser, command_line, positive_int, ranks, repeats, size, write_result
from plait.launch import run_ranks


def _sizes(min_kb: int, max_mb: int) -> list[int]:
    sizes, size = [], min_kb << 10
    while size <= max_mb << 20:
        sizes.append(size)
        size *= 4
    return sizes


def _event_ms(fn, warmup: int, iters: int, sync=None) -> float:
    """Median ms of ``fn`` over ``iters`` runs, each bracketed by CUDA events (``sync`` first, untimed)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if sync is not None:
            sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def all_reduce_rank(rank: int, world: int, sizes: list[int], warmup: int, iters: int) -> list[dict]:
    """Latency per size for ipc (and nccl with a GPU per rank), measured on this rank."""
    import torch.distributed as dist

    from plait.comm import Communicator

    own_gpu = torch.cuda.device_count() >= world
    torch.cuda.set_device(rank if own_gpu else 0)
    dist.init_process_group("nccl" if own_gpu else "gloo")
    comms = {"ipc": Communicator.create("ipc", None, name="bench-ipc")}
    if own_gpu:
        comms["nccl"] = Communicator.create("torch", None, name="bench-nccl")
    rows = []
    for backend, comm in comms.items():
        for size in sizes:
            x = torch.ones(size // 2, dtype=torch.bfloat16, device="cuda")
            ms = _event_ms(lambda: comm.all_reduce(x), warmup, iters, sync=comm.barrier)
            slowest = comm.all_reduce(torch.tensor([ms], dtype=torch.float32, device="cuda"), op="max").item()
            rows.append(dict(backend=backend, world=world, bytes=size, ms=slowest,
                             bus_gb_s=2 * (world - 1) / world * size / (slowest * 1e-3) / 1e9,
                             placement="own GPU" if own_gpu else "shared GPU"))
    dist.barrier()
    dist.destroy_process_group()
    return rows


def gemm_beside_comm_rank(rank: int, world: int, shape: tuple[int, int, int], warmup: int, iters: int) -> dict:
    """The GEMM's ms alone and with the row reduction looping beside it (one process, one GPU)."""
    import torch.distributed as dist

    from plait.comm import Communicator
    from plait.comm.symmetric import SymmetricMemory
    from plait.tp.fused import READY, REDUCE_BLOCKS

    torch.cuda.set_device(0)
    dist.init_process_group("gloo")
    comm = Communicator.create("ipc", None, name="bench-gemm-comm")
    m, n, k = shape
    a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(k, n, dtype=torch.bfloat16, device="cuda")
    rows, cols = 4096, 8192                      # a TP row layer's output: 64 MiB of bf16
    memory = SymmetricMemory(comm, rows * cols * 2)
    memory.flags(0).fill_(1 << 30)               # every chunk already published: the kernel only moves data
    out = torch.empty(rows, cols, dtype=torch.bfloat16, device="cuda")
    reduce = lambda stream=None: memory.reduce_rows(out, rows, (0, rows), 128, READY, 1, REDUCE_BLOCKS, stream)
    gemm_ms = _event_ms(lambda: torch.matmul(a, b), warmup, iters)
    reduce_ms = _event_ms(reduce, warmup, iters)
    side = torch.cuda.Stream()
    repeats = max(1, int(1.5 * gemm_ms / reduce_ms) + 1)

    def gemm_with_reduce_beside():
        side.wait_stream(torch.cuda.current_stream())
        for _ in range(repeats):
            reduce(side)
        torch.matmul(a, b)
        torch.cuda.current_stream().wait_stream(side)

    def gemm_timed_inside() -> float:
        side.wait_stream(torch.cuda.current_stream())
        for _ in range(repeats):
            reduce(side)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, b)
        end.record()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    for _ in range(warmup):
        gemm_with_reduce_beside()
    beside_ms = statistics.median(gemm_timed_inside() for _ in range(iters))
    memory.check("bench")
    flops = 2 * m * n * k
    dist.destroy_process_group()
    return dict(gemm=list(shape), gemm_alone_ms=gemm_ms, gemm_beside_ms=beside_ms,
                gemm_alone_tflops=flops / gemm_ms / 1e9, gemm_beside_tflops=flops / beside_ms / 1e9,
                kept=gemm_ms / beside_ms, reduce_ms=reduce_ms, reduce_blocks=REDUCE_BLOCKS,
                reduce_gb_s=2 * rows * cols * 2 / (reduce_ms * 1e-3) / 1e9)


def main(argv=None) -> int:
    parser = bench_parser("comm_gpu", "GPU: IPC all-reduce sweep and GEMM throughput beside the comm kernel")
    parser.add_argument("--world", type=ranks(), nargs="+", default=[2, 4])
    parser.add_argument("--min-kb", type=size(), default=1)
    parser.add_argument("--max-mb", type=positive_int(1 << 14), default=64)
    parser.add_argument("--gemm", type=size(), nargs=3, default=[8192, 8192, 8192], metavar=("M", "N", "K"))
    parser.add_argument("--warmup", type=repeats(0), default=5)
    parser.add_argument("--iters", type=repeats(), default=20)
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("plait bench comm_gpu: needs a CUDA GPU (the CPU half is plait bench comm)")
        return 0
    sizes = _sizes(args.min_kb, args.max_mb)
    sweep = []
    for world in args.world:
        print(f"all-reduce, {world} ranks: {len(sizes)} sizes ...", flush=True)
        sweep += run_ranks(all_reduce_rank, world, sizes, args.warmup, args.iters, timeout=1200)[0]
    print("GEMM beside the comm kernel ...", flush=True)
    beside = run_ranks(gemm_beside_comm_rank, 1, tuple(args.gemm), args.warmup, args.iters, timeout=600)[0]
    header = ["backend", "ranks", "placement", "bytes", "ms", "bus GB/s"]
    table = [[r["backend"], r["world"], r["placement"], r["bytes"], round(r["ms"], 4), round(r["bus_gb_s"], 2)]
             for r in sweep]
    for line in [header, *table]:
        print("  ".join(str(c).rjust(10) for c in line))
    print(f"GEMM {args.gemm}: {beside['gemm_alone_tflops']:.1f} TFLOP/s alone, {beside['gemm_beside_tflops']:.1f} "
          f"beside the row reduction ({beside['reduce_blocks']} blocks, {beside['reduce_gb_s']:.0f} GB/s): "
          f"{beside['kept']:.1%} kept (target >= 90%)")
    if not args.no_save:
        command = command_line("comm_gpu", argv)
        path = write_result("comm_gpu", {"rows": sweep, "gemm_beside_comm": beside,
                                         "table": {"columns": header, "rows": table}}, command)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
