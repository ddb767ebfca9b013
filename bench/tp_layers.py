"""Forward+backward time of a tensor-parallel MLP: overlap "none" vs "chunked" (and "fused" on CUDA), TP 2 and 4.

    python bench/tp_layers.py [--tp 2 4] [--tokens 512 2048] [--hidden 512] [--sp both]
                              [--overlap none chunked fused] [--comm auto|mesh|ipc]
    plait bench tp_layers ...

The MLP is ColumnParallelLinear(H, 4H, GELU) -> RowParallelLinear(4H, H), fp32 on
CPU (gloo, one thread per rank) or bf16 on CUDA, where "fused" (plait.tp.fused) also runs,
over plait's IPC communicator (ranks sharing one GPU when there are fewer GPUs than ranks,
labelled by the backend column). ``--overlap`` picks the modes ("fused" is skipped, with a
line, where CUDA IPC is unusable). ``--comm`` says what carries "none" and "chunked": the
mesh's TP group (NCCL, or gloo when ranks share a GPU), plait's IPC communicator, or
``auto``: IPC when ranks share a GPU (gloo would copy every CUDA tensor through the host,
so fused-vs-chunked would compare transports, not overlap), else the mesh (the "comm"
column). Each configuration runs ``--warmup`` untimed and ``--iters`` timed steps; a step's
time is the slowest rank's, the figure reported is the median over steps. Results go to
bench/results/ as JSON, with the dense one-process MLP as a reference.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import plait
from plait.bench.common import bench_parser, command_line, print_table, ranks, repeats, size, write_result
from plait.launch import run_ranks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(step, device, warmup: int, iters: int, barrier=None) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if barrier is not None:
            barrier()
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _device_and_dtype(rank: int) -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count()), torch.bfloat16
    return torch.device("cpu"), torch.float32


def _ipc_group(mesh, device: torch.device):
    """plait's IPC communicator over the TP group, or None and why it cannot be used."""
    if device.type != "cuda":
        return None, "needs CUDA"
    from plait.comm import Communicator, IpcCommunicator

    usable, why = IpcCommunicator.usable_for(mesh.tp_comm)
    return (Communicator.create("ipc", mesh.groups["tp"], name="tp-ipc"), "") if usable else (None, why)


def bench_rank(rank: int, world: int, configs: list[dict], warmup: int, iters: int,
               overlaps: tuple[str, ...] = ("none", "chunked", "fused"), comm: str = "auto") -> list[dict]:
    device, dtype = _device_and_dtype(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # NCCL cannot put two ranks on one GPU: ranks sharing a GPU use gloo (labelled in the result).
    backend = "nccl" if device.type == "cuda" and torch.cuda.device_count() >= world else "gloo"
    mesh = plait.init_mesh(tp=world, backend=backend)
    ipc, why = _ipc_group(mesh, device) if "fused" in overlaps or comm != "mesh" else (None, "")
    if comm == "ipc" and ipc is None:
        raise RuntimeError(f"--comm ipc: plait's IPC communicator is unusable here: {why}")
    unfused = ipc if comm == "ipc" or (comm == "auto" and backend == "gloo") else None
    modes = [m for m in overlaps if m != "fused" or ipc is not None]
    groups = {m: ipc if m == "fused" else unfused for m in modes}
    if "fused" in overlaps and ipc is None and rank == 0:
        print(f"  overlap='fused' skipped: {why}", flush=True)
    out = []
    for cfg in configs:
        hidden, tokens, sp = cfg["hidden"], cfg["tokens"], cfg["sp"]
        torch.manual_seed(0)
        x_rows = tokens // world if sp else tokens
        x = torch.randn(x_rows, 1, hidden, device=device, dtype=dtype, requires_grad=True)
        row_ms = {}
        for overlap in modes:
            group = groups.get(overlap)
            col = plait.ColumnParallelLinear(hidden, 4 * hidden, activation="gelu", sequence_parallel=sp,
                                             overlap=overlap, group=group, dtype=dtype, device=device)
            row = plait.RowParallelLinear(4 * hidden, hidden, sequence_parallel=sp, overlap=overlap,
                                          group=group, dtype=dtype, device=device)
            times = _steps(lambda: row(col(x)).float().sum().backward(), device, warmup, iters,
                           barrier=mesh.tp_comm.barrier)
            slowest = mesh.tp_comm.all_reduce(torch.tensor(times, dtype=torch.float64), op="max")
            row_ms[overlap] = statistics.median(slowest.tolist())
        result = {**cfg, "tp": world, "backend": backend, "comm": "ipc" if unfused is not None else backend,
                  **{f"{m}_ms": ms for m, ms in row_ms.items()}}
        for key, slow, fast in (("speedup", "none", "chunked"), ("fused_speedup", "none", "fused"),
                                ("fused_vs_chunked", "chunked", "fused")):
            if slow in row_ms and fast in row_ms:
                result[key] = row_ms[slow] / row_ms[fast]
        out.append(result)
    plait.destroy_mesh()
    return out


def dense_ms(hidden: int, tokens: int, warmup: int, iters: int) -> float:
    device, dtype = _device_and_dtype(0)
    torch.set_num_threads(1)
    fc1 = nn.Linear(hidden, 4 * hidden, device=device, dtype=dtype)
    fc2 = nn.Linear(4 * hidden, hidden, device=device, dtype=dtype)
    x = torch.randn(tokens, 1, hidden, device=device, dtype=dtype, requires_grad=True)
    return statistics.median(_steps(lambda: fc2(F.gelu(fc1(x))).float().sum().backward(), device, warmup, iters))


def main(argv=None) -> int:
    parser = bench_parser("tp_layers", "TP MLP forward+backward: overlap none vs chunked (vs fused on CUDA)")
    parser.add_argument("--tp", type=ranks(), nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=size(), nargs="+", default=[512, 2048])
    parser.add_argument("--hidden", type=size(), nargs="+", default=[512])
    parser.add_argument("--sp", choices=["off", "on", "both"], default="both")
    parser.add_argument("--overlap", nargs="+", choices=["none", "chunked", "fused"],
                        default=["none", "chunked", "fused"], help="overlap modes to time (fused: CUDA only)")
    parser.add_argument("--comm", choices=["auto", "mesh", "ipc"], default="auto",
                        help="what carries none/chunked (see the module docstring)")
    parser.add_argument("--warmup", type=repeats(0), default=3)
    parser.add_argument("--iters", type=repeats(), default=10)
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    sps = {"off": [False], "on": [True], "both": [False, True]}[args.sp]
    configs = [dict(hidden=h, tokens=t, sp=sp) for h in args.hidden for t in args.tokens for sp in sps]
    rows = []
    for tp in args.tp:
        for cfg in configs:
            if cfg["tokens"] % tp:
                parser.error(f"--tokens {cfg['tokens']} must be divisible by TP {tp}")
        print(f"TP={tp}: {len(configs)} configurations ...", flush=True)
        rows += run_ranks(bench_rank, tp, configs, args.warmup, args.iters, tuple(args.overlap), args.comm,
                          timeout=1800)[0]
    dense = {(h, t): dense_ms(h, t, args.warmup, args.iters) for h in args.hidden for t in args.tokens}
    figures = {"none_ms": ("none ms", 2), "chunked_ms": ("chunked ms", 2), "speedup": ("chunked speedup", 3),
               "fused_ms": ("fused ms", 2), "fused_speedup": ("fused speedup", 3),
               "fused_vs_chunked": ("fused vs chunked", 3)}
    header = ["tp", "sp", "tokens", "hidden", "backend", "comm", "dense 1 proc ms",
              *(label for label, _ in figures.values())]
    table = [[r["tp"], "on" if r["sp"] else "off", r["tokens"], r["hidden"], r["backend"], r["comm"],
              round(dense[(r["hidden"], r["tokens"])], 2),
              *(round(r[key], digits) if key in r else "-" for key, (_, digits) in figures.items())] for r in rows]
    print_table(header, table)
    if not args.no_save:
        command = command_line("tp_layers", argv)
        path = write_result("tp_layers", {"rows": rows, "dense_ms": {f"{h}x{t}": v for (h, t), v in dense.items()},
                                          "table": {"columns": header, "rows": table},
                                          "warmup": args.warmup, "iters": args.iters}, command)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
