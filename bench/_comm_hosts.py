"""``plait bench comm --hosts N``: plait's hierarchical all-reduce against flat gloo over N hosts.

    plait bench comm --hosts 2 [--ranks 2] [--sizes 4K ... 64M] [--dtypes float32]

Runs on N test hosts made on this machine (:mod:`plait.bench._hosts`: each host its own
network namespace, hostname and /dev/shm, so plait sees N machines; needs root), ``--ranks``
ranks on each, the same timing as the one-host benchmark (bench/comm.py): both backends in
one job, trials alternating, the slowest rank per call, median and p99. ``gloo`` is
``torch.distributed`` over all ranks (flat); ``hier`` is ``Communicator.create("hier")``:
shm inside each host, gloo between hosts on 1/L of the message per rank
(:mod:`plait.comm.hier`); ``auto`` picks it for such groups.

Between test hosts, traffic crosses a veth pair and a bridge in the kernel: real networks
are slower per byte, which favours hier more (it sends 1/L as much between hosts).

Results go to bench/results/comm_hosts-<device>-<date>.json (``targets``: the issue's
hier >= 2x faster than gloo from 1 MB and never slower), with a PNG beside it.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from plait.bench import comm
from plait.bench._hosts import HostsUnavailable, TestHosts
from plait.bench.common import command_line, finish_figure, print_table, save_plot, write_result

SPEEDUP_FROM = 1 << 20   # the issue: >= 2x from 1 MB up, never slower at any size
SPEEDUP = 2.0


def table(rows: list[dict]) -> dict:
    """One line per (op, hosts, ranks, dtype, size): gloo and hier medians and p99s, and the speedup."""
    index = {(r["op"], r["hosts"], r["ranks"], r["dtype"], r["bytes"], r["backend"]): r for r in rows}
    columns = ["op", "hosts", "ranks per host", "dtype", "size", "gloo us", "hier us", "gloo p99 us", "hier p99 us",
               "hier speedup vs gloo"]
    lines = []
    for key in sorted({k[:5] for k in index}):
        gloo, hier = index.get((*key, "gloo"), {}), index.get((*key, "hier"), {})
        op, hosts, ranks, dtype, nbytes = key
        lines.append([op, hosts, ranks // hosts, dtype, comm.label(nbytes), _round(gloo.get("latency_us")),
                      _round(hier.get("latency_us")), _round(gloo.get("p99_us")), _round(hier.get("p99_us")),
                      comm._ratio(gloo.get("latency_us"), hier.get("latency_us"))])
    return {"columns": columns, "rows": lines}


def targets(rows: list[dict]) -> dict:
    """The issue's bounds from the all_reduce rows: the smallest speedup (gloo / hier median) from 1 MB up
    (>= 2) and at any size (>= 1), per host count, ranks and dtype."""
    index = {(r["hosts"], r["ranks"], r["dtype"], r["bytes"], r["backend"]): r["latency_us"] for r in rows
             if r["op"] == "all_reduce"}
    goals = {}
    for hosts, ranks, dtype in sorted({k[:3] for k in index}):
        speedups = {nbytes: gloo / index[(hosts, ranks, dtype, nbytes, "hier")]
                    for (h, r, d, nbytes, name), gloo in index.items()
                    if (h, r, d, name) == (hosts, ranks, dtype, "gloo") and (h, r, d, nbytes, "hier") in index}
        where = f"{dtype} {hosts} hosts x {ranks // hosts} ranks"
        large = [s for nbytes, s in speedups.items() if nbytes >= SPEEDUP_FROM]
        if large:
            goals[f"slowest speedup from 1M, {where}"] = {
                "value": round(min(large), 3), "target": SPEEDUP, "met": min(large) >= SPEEDUP,
                "of": "gloo / hier median, the worst size from 1 MB up"}
        if speedups:
            goals[f"slowest speedup at any size, {where}"] = {
                "value": round(min(speedups.values()), 3), "target": 1.0, "met": min(speedups.values()) >= 1.0,
                "of": "gloo / hier median, the worst size"}
    return goals


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def plot(rows: list[dict], path: Path) -> bool:
    """Median latency of both backends, and the speedup, against size; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (lat_ax, ratio_ax) = plt.subplots(1, 2, figsize=(11, 4.4))
    for hosts, ranks, dtype in sorted({(r["hosts"], r["ranks"], r["dtype"]) for r in rows}):
        where = f"{hosts}x{ranks // hosts} {dtype}"
        series = {b: comm._series(rows, op="all_reduce", hosts=hosts, ranks=ranks, dtype=dtype, backend=b)
                  for b in ("gloo", "hier")}
        for backend, line in series.items():
            lat_ax.plot([r["bytes"] for r in line], [r["latency_us"] for r in line], marker="o",
                        linestyle="-" if backend == "hier" else "--", label=f"{backend} {where}")
        hier = {r["bytes"]: r["latency_us"] for r in series["hier"]}
        points = [(r["bytes"], r["latency_us"] / hier[r["bytes"]]) for r in series["gloo"] if r["bytes"] in hier]
        if points:
            ratio_ax.plot(*zip(*points), marker="o", label=where)
    ratio_ax.axhline(SPEEDUP, color="grey", linestyle=":", linewidth=0.8)
    ratio_ax.axhline(1.0, color="grey", linewidth=0.8)
    lat_ax.set_title("all_reduce median latency")
    lat_ax.set_ylabel("us per call")
    ratio_ax.set_title("speedup: gloo / hier (target >= 2 from 1 MB)")
    ratio_ax.set_ylabel("time ratio")
    for ax in (lat_ax, ratio_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    lat_ax.set_yscale("log")
    finish_figure(fig, "all_reduce across test hosts: plait hier vs flat gloo", path)
    return True


def main(args: argparse.Namespace, argv) -> int:
    """Run the benchmark on ``args.hosts`` test hosts with ``args.ranks[0]`` ranks each (bench/comm.py's args)."""
    if len(args.ranks) != 1:
        raise ValueError(f"--hosts takes one --ranks (ranks per host), got {args.ranks}")
    per_host = args.ranks[0]
    load_before = os.getloadavg()
    print(f"{args.hosts} hosts x {per_host} ranks: {', '.join(args.ops)}, {', '.join(args.dtypes)} at "
          f"{len(args.sizes)} sizes ...", flush=True)
    try:
        with TestHosts(args.hosts) as hosts:
            result = hosts.run_ranks(comm.bench_rank, per_host, args.ops, args.dtypes, args.sizes, args.trials,
                                     args.trial_s, False, args.hosts, timeout=3600)[0]
    except HostsUnavailable as exc:
        raise OSError(f"plait bench comm --hosts needs test hosts on this machine: {exc}") from exc
    rows = result["rows"]
    summary = table(rows)
    print_table(summary["columns"], summary["rows"])
    goals = targets(rows)
    missed = [name for name, goal in goals.items() if not goal["met"]]
    print(f"issue #22 targets: {len(goals) - len(missed)} of {len(goals)} met")
    for name in missed:
        print(f"  missed: {name}: {goals[name]['value']} (bound {goals[name]['target']})")
    if not args.no_save:
        load_after = os.getloadavg()
        # other work on the machine slows both backends, unevenly: the docs table says how busy it was
        titled = {"title": f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after, on "
                           f"{os.cpu_count()} cores", **summary}
        path = write_result("comm_hosts", {"rows": rows, "tables": [titled], "targets": goals, "trials": args.trials,
                                           "trial_s": args.trial_s, "dtypes": args.dtypes, "threads_per_rank": 1,
                                           "hosts": args.hosts, "ranks_per_host": per_host,
                                           "load_average_before": load_before, "load_average_after": load_after},
                            command_line("comm", argv))
        print(f"wrote {path}")
        save_plot(plot, rows, path.with_suffix(".png"))
    return 0
