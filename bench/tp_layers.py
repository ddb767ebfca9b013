"""Forward+backward time of a tensor-parallel MLP: overlap "none" vs "chunked" (and "fused" on CUDA), TP 2 and 4.

    python bench/tp_layers.py [--tp 2 4] [--tokens 512 2048] [--hidden 512] [--sp both]
    plait bench tp_layers ...

The MLP is ColumnParallelLinear(H, 4H, GELU) -> RowParallelLinear(4H, H), fp32 on
CPU (gloo, one thread per rank) or bf16 on CUDA, where "fused" (plait.tp.fused) also runs,
over plait's IPC communicator (ranks sharing one GPU when there are fewer GPUs than ranks,
labelled by the backend column). Each configuration runs
``--warmup`` untimed and ``--iters`` timed steps; a step's time is the slowest
rank's, the figure reported is the median over steps. Results go to
bench/results/ as JSON, with the dense one-process MLP as a reference.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

import plait
from plait.bench.common import command_line, print_table, wall_times_ms, write_result
from plait.launch import run_ranks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(step, device, warmup: int, iters: int, barrier=None) -> list[float]:
    return wall_times_ms(step, warmup, iters, barrier, sync=lambda: _sync(device))


def _device_and_dtype(rank: int) -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count()), torch.bfloat16
    return torch.device("cpu"), torch.float32


def bench_rank(rank: int, world: int, configs: list[dict], warmup: int, iters: int) -> list[dict]:
    device, dtype = _device_and_dtype(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # NCCL cannot put two ranks on one GPU: ranks sharing a GPU use gloo (labelled in the result).
    backend = "nccl" if device.type == "cuda" and torch.cuda.device_count() >= world else "gloo"
    mesh = plait.init_mesh(tp=world, backend=backend)
    modes, groups = ["none", "chunked"], {}
    if device.type == "cuda":
        from plait.comm import Communicator, IpcCommunicator

        usable, why = IpcCommunicator.usable_for(mesh.tp_comm)
        if usable:
            modes.append("fused")
            groups["fused"] = Communicator.create("ipc", mesh.groups["tp"], name="tp-ipc")
        elif rank == 0:
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
        result = {**cfg, "tp": world, "backend": backend, "none_ms": row_ms["none"],
                  "chunked_ms": row_ms["chunked"], "speedup": row_ms["none"] / row_ms["chunked"]}
        if "fused" in row_ms:
            result.update(fused_ms=row_ms["fused"], fused_speedup=row_ms["none"] / row_ms["fused"])
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
    parser = argparse.ArgumentParser(description="TP MLP forward+backward: overlap none vs chunked (vs fused on CUDA)")
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--hidden", type=int, nargs="+", default=[512])
    parser.add_argument("--sp", choices=["off", "on", "both"], default="both")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    sps = {"off": [False], "on": [True], "both": [False, True]}[args.sp]
    configs = [dict(hidden=h, tokens=t, sp=sp) for h in args.hidden for t in args.tokens for sp in sps]
    rows = []
    for tp in args.tp:
        for cfg in configs:
            if cfg["tokens"] % tp:
                raise SystemExit(f"--tokens {cfg['tokens']} must be divisible by TP {tp}")
        print(f"TP={tp}: {len(configs)} configurations ...", flush=True)
        rows += run_ranks(bench_rank, tp, configs, args.warmup, args.iters, timeout=1800)[0]
    dense = {(h, t): dense_ms(h, t, args.warmup, args.iters) for h in args.hidden for t in args.tokens}
    header = ["tp", "sp", "tokens", "hidden", "backend", "dense 1 proc ms", "none ms", "chunked ms",
              "chunked speedup", "fused ms", "fused speedup"]
    table = [[r["tp"], "on" if r["sp"] else "off", r["tokens"], r["hidden"], r["backend"],
              round(dense[(r["hidden"], r["tokens"])], 2), round(r["none_ms"], 2), round(r["chunked_ms"], 2),
              round(r["speedup"], 3), round(r["fused_ms"], 2) if "fused_ms" in r else "-",
              round(r["fused_speedup"], 3) if "fused_speedup" in r else "-"] for r in rows]
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
