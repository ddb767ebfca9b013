"""Collective latency and bus bandwidth on CPU: plait's shm backend vs torch.distributed gloo.

    python bench/comm.py [--ranks 2 4] [--sizes 1K 4K ... 64M] [--ops all_reduce]
    plait bench comm ...

Both backends run in the same spawned job, one size at a time, alternating, so they
share the machine's conditions. A measurement is ``k`` back-to-back calls between two
barriers (``k`` chosen so a trial lasts about ``--trial-s``), timed on every rank; a
trial's time per call is the slowest rank's, and the figure reported is the median of
``--trials`` trials. Bus bandwidth follows the nccl-tests convention: bytes / time
times 2(n-1)/n for all_reduce, (n-1)/n for all_gather and reduce_scatter (bytes of the
full tensor), 1 for broadcast. fp32 tensors, one thread per rank.

Results go to bench/results/comm-<device>-<date>.json, with a PNG of latency and bus
bandwidth beside it when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from plait.bench.common import command_line, print_table, machine_info, write_result
from plait.launch import run_ranks

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")
DEFAULT_SIZES = ("1K", "4K", "16K", "64K", "256K", "1M", "4M", "16M", "32M", "64M")


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4096, 64K or 32M")
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]


def label(nbytes: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift}{unit}"
    return str(nbytes)


def bus_factor(op: str, world: int) -> float:
    return {"all_reduce": 2 * (world - 1) / world, "all_gather": (world - 1) / world,
            "reduce_scatter": (world - 1) / world, "broadcast": 1.0}[op]


def _call(comm, op: str, x: torch.Tensor, world: int):
    """One operation on a tensor of nbytes in total (all_gather: each rank sends 1/world of it)."""
    if op == "all_reduce":
        return comm.all_reduce(x)
    if op == "all_gather":
        return comm.all_gather(x[: x.numel() // world])
    if op == "reduce_scatter":
        return comm.reduce_scatter(x)
    return comm.broadcast(x, src=0)


def _time_calls(comm, op: str, x: torch.Tensor, world: int, calls: int, sync) -> float:
    sync.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        _call(comm, op, x, world)
    return (time.perf_counter() - start) / calls


def bench_rank(rank: int, world: int, ops: list[str], sizes: list[int], trials: int, trial_s: float) -> list[dict]:
    import torch.distributed as dist

    from plait.comm import Communicator

    dist.init_process_group("gloo")
    comms = {"gloo": Communicator.create("torch", None, name="gloo"),
             "shm": Communicator.create("shm", None, name="shm")}
    sync = comms["gloo"]  # barriers and the max over ranks: outside the timed region
    rows = []
    for op in ops:
        for nbytes in sizes:
            numel = max(world, nbytes // 4 // world * world)
            x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
            per_backend = {}
            for name, comm in comms.items():
                first = _time_calls(comm, op, x, world, 1, sync)  # warm-up, and a first estimate
                estimate = _time_calls(comm, op, x, world, 2, sync)
                worst = sync.all_reduce(torch.tensor([min(first, estimate)], dtype=torch.float64), op="max")
                per_backend[name] = (comm, max(1, min(20000, int(trial_s / max(worst.item(), 1e-7)))))
            times = {name: [] for name in comms}
            for _ in range(trials):
                for name, (comm, calls) in per_backend.items():  # alternate: same conditions for both
                    t = _time_calls(comm, op, x, world, calls, sync)
                    times[name].append(sync.all_reduce(torch.tensor([t], dtype=torch.float64), op="max").item())
            total = numel * 4
            for name, samples in times.items():
                seconds = statistics.median(samples)
                rows.append({"op": op, "ranks": world, "bytes": total, "backend": name,
                             "calls_per_trial": per_backend[name][1], "latency_us": seconds * 1e6,
                             "algbw_GBps": total / seconds / 1e9,
                             "busbw_GBps": total / seconds / 1e9 * bus_factor(op, world),
                             "trials_us": [s * 1e6 for s in samples]})
    comms["shm"].close()
    dist.destroy_process_group()
    return rows


def table(rows: list[dict]) -> dict:
    """One line per (op, ranks, size): both latencies, the speedup, both bus bandwidths."""
    index = {(r["op"], r["ranks"], r["bytes"], r["backend"]): r for r in rows}
    columns = ["op", "ranks", "size", "gloo us", "shm us", "shm speedup", "gloo busbw GB/s", "shm busbw GB/s"]
    lines = []
    for op, ranks, nbytes in sorted({k[:3] for k in index}, key=lambda k: (k[0], k[1], k[2])):
        gloo, shm = index[(op, ranks, nbytes, "gloo")], index[(op, ranks, nbytes, "shm")]
        lines.append([op, ranks, label(nbytes), round(gloo["latency_us"], 1), round(shm["latency_us"], 1),
                      round(gloo["latency_us"] / shm["latency_us"], 1), round(gloo["busbw_GBps"], 2),
                      round(shm["busbw_GBps"], 2)])
    return {"columns": columns, "rows": lines}


def plot(rows: list[dict], path: Path) -> bool:
    """Latency and bus bandwidth against size, per backend and rank count; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (op, ranks, backend) in sorted({(r["op"], r["ranks"], r["backend"]) for r in rows}):
        line = sorted((r for r in rows if (r["op"], r["ranks"], r["backend"]) == (op, ranks, backend)),
                      key=lambda r: r["bytes"])
        style = dict(marker="o", linestyle="-" if backend == "shm" else "--", label=f"{backend} {op} {ranks} ranks")
        left.plot([r["bytes"] for r in line], [r["latency_us"] for r in line], **style)
        right.plot([r["bytes"] for r in line], [r["busbw_GBps"] for r in line], **style)
    for ax, what in ((left, "latency per call (us)"), (right, "bus bandwidth (GB/s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    machine = machine_info()
    fig.suptitle(f"CPU collectives, {machine['cpu']}, {machine['cores']} cores: plait shm vs gloo")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="CPU collectives: plait shm vs gloo, latency and bus bandwidth")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[parse_size(s) for s in DEFAULT_SIZES],
                        help="total message sizes, e.g. 4K 64K 32M (default 1K..64M)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=["all_reduce"])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--trial-s", type=float, default=0.1, help="target seconds per trial and backend")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON or PNG")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    rows = []
    for world in args.ranks:
        print(f"{world} ranks: {', '.join(args.ops)} at {len(args.sizes)} sizes ...", flush=True)
        rows += run_ranks(bench_rank, world, args.ops, args.sizes, args.trials, args.trial_s, timeout=3600)[0]
    result = table(rows)
    print_table(result["columns"], result["rows"])
    if not args.no_save:
        command = command_line("comm", argv)
        # Other processes on the machine slow both backends; the load average says how busy it was.
        path = write_result("comm", {"rows": rows, "table": result, "trials": args.trials, "trial_s": args.trial_s,
                                     "dtype": "float32", "threads_per_rank": 1,
                                     "load_average_before": load_before, "load_average_after": os.getloadavg()},
                            command)
        print(f"wrote {path}")
        if plot(rows, path.with_suffix(".png")):
            print(f"wrote {path.with_suffix('.png')}")
        else:
            print("matplotlib is not installed: no PNG (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
