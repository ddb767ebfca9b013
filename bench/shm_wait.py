"""The shm backend's wait strategy: latency back to back, and CPU burnt by a rank that waits long.

    python bench/shm_wait.py [--ranks 2 4] [--spin auto 0 20] [--calls 3000] [--idle-s 2]
    plait bench shm_wait ...

For each group size and spin setting (``auto``: the default learned budget, capped at 1 ms;
a number: that cap in microseconds, 0 sleeping at once, like PLAIT_SHM_SPIN_US), one job
measures:

- back to back: ``--calls`` float32 all-reduces of 4 KB, each timed on its own; the
  median and 99th percentile of the slowest rank per call, and the CPU time each rank used
  per call (``time.process_time``, the whole process);
- idle: every rank but the last enters an all-reduce while the last sleeps ``--idle-s``
  seconds; the CPU the waiting ranks used, as a share of one core;
- the learned spin budget after each phase (``ShmGroup.spin_budget_us``).

With more ranks than cores, ranks take turns on the CPUs, so latency there says how well
waiters give way. Results go to bench/results/shm_wait-<device>-<date>.json;
docs/shm-wait.md discusses them.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch

from plait.bench.common import command_line, print_table, write_result
from plait.launch import run_ranks


def wait_rank(rank: int, world: int, spin: str, calls: int, idle_s: float) -> dict:
    import torch.distributed as dist

    from plait.comm.shm_backend import ShmCommunicator
    from plait.comm.shm_config import ShmConfig
    from plait.comm.torch_backend import TorchCommunicator

    dist.init_process_group("gloo")
    config = ShmConfig.from_env(world)
    if spin != "auto":
        config = dataclasses.replace(config, spin_us=int(spin))
    comm = ShmCommunicator(None, name="wait", config=config)
    sync = TorchCommunicator(None, name="sync")
    x = torch.zeros(1024)
    for _ in range(100):
        comm.all_reduce(x)
    samples = torch.empty(calls, dtype=torch.float64)
    comm.barrier()
    cpu = time.process_time()
    for i in range(calls):
        start = time.perf_counter()
        comm.all_reduce(x)
        samples[i] = time.perf_counter() - start
    busy_cpu_us = (time.process_time() - cpu) / calls * 1e6
    busy_budget = comm._group.spin_budget_us
    per_call = sorted(sync.all_reduce(samples, op="max").tolist())
    comm.barrier()
    if rank == world - 1:
        time.sleep(idle_s)
    wall, cpu = time.monotonic(), time.process_time()
    comm.all_reduce(x)
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    report = {"median_us": statistics.median(per_call) * 1e6,
              "p99_us": per_call[min(len(per_call) - 1, int(0.99 * len(per_call)))] * 1e6,
              "busy_cpu_us_per_call": busy_cpu_us, "busy_budget_us": busy_budget,
              "idle_cpu_share": cpu / wall if rank != world - 1 else None,
              "idle_budget_us": comm._group.spin_budget_us, "cap_us": comm._group.spin_cap_us}
    comm.close()
    dist.destroy_process_group()
    return report


def summarize(world: int, spin: str, reports: list[dict]) -> dict:
    """One row from every rank's report: latency from rank 0 (all ranks agree), the rest averaged or maxed."""
    waiting = [r["idle_cpu_share"] for r in reports if r["idle_cpu_share"] is not None]
    return {"ranks": world, "spin": spin, "cap_us": reports[0]["cap_us"], "median_us": reports[0]["median_us"],
            "p99_us": reports[0]["p99_us"],
            "busy_cpu_us_per_call": statistics.mean(r["busy_cpu_us_per_call"] for r in reports),
            "busy_budget_us": statistics.mean(r["busy_budget_us"] for r in reports),
            "idle_cpu_share_max": max(waiting), "idle_budget_us": statistics.mean(r["idle_budget_us"] for r in reports)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="shm wait strategy: back-to-back latency and idle CPU use")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--spin", nargs="+", default=["auto", "0", "20"],
                        help="spin caps to compare: auto (the default) or microseconds")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--idle-s", type=float, default=2.0)
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    if min(args.ranks) < 2 or args.calls < 1 or not args.idle_s > 0:
        parser.error("--ranks must be at least 2, --calls at least 1 and --idle-s positive")
    if any(s != "auto" and not s.isdigit() for s in args.spin):
        parser.error("--spin takes auto or whole microseconds")
    load_before = os.getloadavg()
    rows = [summarize(world, spin, run_ranks(wait_rank, world, spin, args.calls, args.idle_s, timeout=600))
            for world in args.ranks for spin in args.spin]
    columns = ["ranks", "spin", "median us", "p99 us", "CPU us per call", "budget us (busy)", "idle CPU share",
               "budget us (after idle)"]
    lines = [[r["ranks"], r["spin"] if r["spin"] != "auto" else f"auto (cap {r['cap_us']})", round(r["median_us"], 1),
              round(r["p99_us"], 1), round(r["busy_cpu_us_per_call"], 1), round(r["busy_budget_us"], 1),
              round(r["idle_cpu_share_max"], 4), round(r["idle_budget_us"], 1)] for r in rows]
    print_table(columns, lines)
    if not args.no_save:
        path = write_result("shm_wait", {"rows": rows, "table": {"columns": columns, "rows": lines},
                                         "message_bytes": 4096, "dtype": "float32", "calls": args.calls,
                                         "idle_s": args.idle_s, "load_average_before": load_before,
                                         "load_average_after": os.getloadavg()}, command_line("shm_wait", argv))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
