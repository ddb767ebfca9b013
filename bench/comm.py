"""Collective latency and bandwidth on CPU: plait's shm backend vs gloo and DeepSpeed's shm all-reduce.

    python bench/comm.py [--ranks 2 4] [--dtypes float32 bfloat16] [--sizes 4K ... 64M] [--ops all_reduce]
    plait bench comm ...
    plait bench comm --hosts 2 ...     hierarchical vs flat gloo across test hosts (bench/_comm_hosts.py)

Every backend runs in the same spawned job, one dtype and size at a time, trials alternating
between backends, so they share the machine's conditions: gloo (``torch.distributed``),
plait's ``shm`` communicator and, when ``deepspeed`` is installed, DeepSpeed's
``inference_all_reduce`` (its shared-memory op; all_reduce only; see bench/_comm_deepspeed.py
for when it falls back to gloo, recorded as ``path``). Each call is timed on its own on
every rank; a call's time is the slowest rank's, and the figures are the median and the
99th percentile over all calls of all trials (``--trials`` trials of about ``--trial-s``
seconds each, at least 10 calls). Before timing, every backend's result is checked against
the exact sum. Bus bandwidth follows the nccl-tests convention: bytes / time times 2(n-1)/n
for all_reduce, (n-1)/n for all_gather and reduce_scatter (bytes of the full tensor), 1 for
broadcast.

The same run times a plain copy of the message (``dst.copy_(x)``, every rank at once): an
in-place all-reduce must read and write the whole tensor at least once on every rank, so
that copy bounds it from below at sizes the caches do not hold; ``shm/copy`` says how close
the all-reduce comes to it.

Results go to bench/results/comm-<device>-<date>.json, with a PNG of latency, the ratio to
DeepSpeed and bus bandwidth beside it when matplotlib is installed.
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

from plait.bench import _comm_deepspeed as comm_deepspeed
from plait.bench.common import command_line, finish_figure, print_table, write_result
from plait.launch import free_port, run_ranks

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")
DEFAULT_SIZES = ("4K", "16K", "64K", "256K", "1M", "4M", "16M", "32M", "64M")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MIN_CALLS = 10


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


class _Copy:
    """The bound: a plain copy of the message on every rank (all_reduce's name, so it times the same way)."""

    def __init__(self) -> None:
        self._out = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self._out is None or self._out.shape != x.shape or self._out.dtype != x.dtype:
            self._out = torch.empty_like(x)
        return self._out.copy_(x)


def _time_calls(run, calls: int, sync) -> list[float]:
    """Seconds of each of ``calls`` back-to-back calls, slowest rank per call."""
    samples = torch.empty(calls, dtype=torch.float64)
    sync.barrier()
    for i in range(calls):
        start = time.perf_counter()
        run()
        samples[i] = time.perf_counter() - start
    return sync.all_reduce(samples, op="max").tolist()


def _check_sum(run, x: torch.Tensor, rank: int, world: int, name: str) -> None:
    """Raise unless ``run`` sums small integers exactly (every dtype here holds them exactly)."""
    x.copy_(torch.arange(x.numel(), dtype=torch.float32).remainder_(7).add_(rank))
    run()
    expected = torch.arange(x.numel(), dtype=torch.float32).remainder_(7).mul_(world).add_(world * (world - 1) / 2)
    if not torch.equal(x.float(), expected):
        raise RuntimeError(f"{name}: all_reduce gave a wrong sum on rank {rank}")


def _open_backends(world: int, deepspeed: bool, hosts: int = 1) -> tuple[dict, dict]:
    """name -> communicator-like object, and each backend's notes (DeepSpeed's path per dtype).
    Over several hosts: flat gloo and plait's hierarchical communicator (shm inside hosts)."""
    from plait.comm import Communicator

    comms = {"gloo": Communicator.create("torch", None, name="gloo")}
    if hosts > 1:
        comms["hier"] = Communicator.create("hier", None, name="hier")
        return comms, {}
    comms["shm"] = Communicator.create("shm", None, name="shm")
    notes = {}
    if deepspeed:
        comms["deepspeed"] = comm_deepspeed.DeepSpeedAllReduce(world)
        notes["deepspeed"] = {name: comms["deepspeed"].path(dtype) for name, dtype in DTYPES.items()}
    return comms, notes


def bench_rank(rank: int, world: int, ops: list[str], dtypes: list[str], sizes: list[int], trials: int,
               trial_s: float, deepspeed: bool, hosts: int = 1) -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    comms, notes = _open_backends(world, deepspeed, hosts)
    sync = comms["gloo"]  # barriers and the max over ranks: outside the timed region
    rows = []
    for op in ops:
        backends = {n: c for n, c in comms.items() if op == "all_reduce" or n != "deepspeed"}
        if op == "all_reduce" and hosts == 1:
            backends["copy"] = _Copy()
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for nbytes in sizes:
                rows += _bench_size(op, backends, sync, rank, world, dtype_name, dtype, nbytes, trials, trial_s,
                                    notes)
    for name in ("shm", "hier"):
        if name in comms:
            comms[name].close()
    if hosts > 1:
        rows = [dict(row, hosts=hosts) for row in rows]
    dist.destroy_process_group()
    return {"rows": rows, "notes": notes}


def _bench_size(op, backends, sync, rank, world, dtype_name, dtype, nbytes, trials, trial_s, notes) -> list[dict]:
    """Rows for one op, dtype and size: every backend, trials alternating between them."""
    numel = max(world, nbytes // dtype.itemsize // world * world)
    x = torch.zeros(numel, dtype=dtype)  # zeros: repeated sums stay finite and exact
    runs = {name: (lambda c=comm: _call(c, op, x, world)) for name, comm in backends.items()}
    calls = {}
    for name, run in runs.items():
        if op == "all_reduce" and name != "copy":
            _check_sum(run, x, rank, world, name)
        x.zero_()
        estimate = min(_time_calls(run, 3, sync)[1:])  # the first call warms up
        calls[name] = max(MIN_CALLS, min(2000, int(trial_s / max(estimate, 1e-7))))
    samples = {name: [] for name in runs}
    for _ in range(trials):
        for name, run in runs.items():
            samples[name] += _time_calls(run, calls[name], sync)
    total = numel * dtype.itemsize
    rows = []
    for name, times in samples.items():
        times.sort()
        median, p99 = statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))]
        rows.append({"op": op, "ranks": world, "dtype": dtype_name, "bytes": total, "backend": name,
                     "calls": len(times), "latency_us": median * 1e6, "p99_us": p99 * 1e6,
                     "algbw_GBps": total / median / 1e9,
                     "busbw_GBps": total / median / 1e9 * (2.0 if name == "copy" else bus_factor(op, world)),
                     **({"path": notes[name][dtype_name]} if name in notes else {})})
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def table(rows: list[dict]) -> dict:
    """One line per (op, ranks, dtype, size): each backend's median (and p99 for shm and DeepSpeed),
    plait's ratio to gloo, to DeepSpeed and to a plain copy. Absent backends leave empty cells."""
    index = {(r["op"], r["ranks"], r.get("dtype", "float32"), r["bytes"], r["backend"]): r for r in rows}
    columns = ["op", "ranks", "dtype", "size", "gloo us", "DeepSpeed us", "shm us", "DeepSpeed p99 us", "shm p99 us",
               "shm speedup vs gloo", "shm/DeepSpeed", "shm/DeepSpeed p99", "DeepSpeed path", "copy us", "shm/copy"]
    lines = []
    for key in sorted({k[:4] for k in index}):
        get = lambda backend, field="latency_us": index.get((*key, backend), {}).get(field)  # noqa: E731
        op, ranks, dtype, nbytes = key
        lines.append([op, ranks, dtype, label(nbytes), _round(get("gloo")), _round(get("deepspeed")),
                      _round(get("shm")), _round(get("deepspeed", "p99_us")), _round(get("shm", "p99_us")),
                      _ratio(get("gloo"), get("shm")), _ratio(get("shm"), get("deepspeed")),
                      _ratio(get("shm", "p99_us"), get("deepspeed", "p99_us")), get("deepspeed", "path"),
                      _round(get("copy")), _ratio(get("shm"), get("copy"))])
    return {"columns": columns, "rows": lines}


# Issue #14's bounds on plait / DeepSpeed (all_reduce, every dtype and rank count measured).
MEDIAN_BOUNDS = {4 << 10: 0.7, 64 << 10: 0.7, 1 << 20: 0.7, 32 << 20: 0.8}
P99_BOUNDS = {4 << 10: 0.7, 64 << 10: 0.7}


def targets(rows: list[dict]) -> dict:
    """The ratios issue #14 asks for, from the measured rows: plait's median (and p99) over DeepSpeed's
    at the sizes it names, per rank count and dtype, and, where ranks outnumber the cores, that plait is
    never slower than gloo. A size that was not measured is left out; a DeepSpeed that fell back to gloo
    (its kernel needs instructions this CPU lacks) is named in ``of``."""
    index = {(r["ranks"], r.get("dtype", "float32"), r["bytes"], r["backend"]): r for r in rows
             if r["op"] == "all_reduce"}
    goals = {}
    for ranks, dtype in sorted({k[:2] for k in index}):
        for field, bounds, what in (("latency_us", MEDIAN_BOUNDS, "median"), ("p99_us", P99_BOUNDS, "p99")):
            for nbytes, bound in bounds.items():
                shm, ds = index.get((ranks, dtype, nbytes, "shm")), index.get((ranks, dtype, nbytes, "deepspeed"))
                if shm is None or ds is None:
                    continue
                ratio = shm[field] / ds[field]
                goals[f"{what} {label(nbytes)} {dtype} {ranks} ranks"] = {
                    "value": round(ratio, 3), "target": bound, "met": ratio <= bound,
                    "of": f"plait shm / DeepSpeed ({ds.get('path', 'shm')})"}
        cores = len(os.sched_getaffinity(0))
        if ranks > cores:
            pairs = [shm["latency_us"] / gloo["latency_us"] for (r, d, nbytes, name), gloo in index.items()
                     if (r, d, name) == (ranks, dtype, "gloo") and (shm := index.get((ranks, dtype, nbytes, "shm")))]
            if pairs:
                worst = max(pairs)
                goals[f"slowest shm / gloo {dtype} {ranks} ranks on {cores} cores"] = {
                    "value": round(worst, 3), "target": 1.0, "met": worst <= 1.0,
                    "of": "plait shm / gloo median, the worst size"}
    return goals


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _series(rows: list[dict], **match) -> list[dict]:
    """The rows matching every field in ``match``, by size."""
    return sorted((r for r in rows if all(r.get(k, "float32" if k == "dtype" else None) == v
                                          for k, v in match.items())), key=lambda r: r["bytes"])


def plot(rows: list[dict], path: Path) -> bool:
    """Latency per dtype, plait's ratio to DeepSpeed, and bus bandwidth against size; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    dtypes = sorted({r.get("dtype", "float32") for r in rows})
    fig, axes = plt.subplots(1, len(dtypes) + 2, figsize=(5.2 * (len(dtypes) + 2), 4.4))
    combos = sorted({(r["op"], r["ranks"], r["backend"]) for r in rows})
    for ax, dtype in zip(axes, dtypes):
        for op, ranks, backend in combos:
            line = _series(rows, op=op, ranks=ranks, backend=backend, dtype=dtype)
            if line:
                ax.plot([r["bytes"] for r in line], [r["latency_us"] for r in line], marker="o",
                        linestyle="-" if backend == "shm" else "--", label=f"{backend} {op} {ranks} ranks")
        ax.set_title(f"median latency, {dtype}")
        ax.set_ylabel("us per call")
        ax.legend(fontsize=6)
    ratio_ax, bw_ax = axes[-2], axes[-1]
    for ranks in sorted({r["ranks"] for r in rows}):
        for dtype in dtypes:
            shm = {r["bytes"]: r for r in _series(rows, op="all_reduce", ranks=ranks, backend="shm", dtype=dtype)}
            ds = _series(rows, op="all_reduce", ranks=ranks, backend="deepspeed", dtype=dtype)
            for field, style in (("latency_us", "-"), ("p99_us", ":")):
                points = [(r["bytes"], shm[r["bytes"]][field] / r[field]) for r in ds if r["bytes"] in shm]
                if points:
                    ratio_ax.plot(*zip(*points), marker="o", linestyle=style,
                                  label=f"{ranks} ranks {dtype} {'median' if field == 'latency_us' else 'p99'}")
        for backend in ("shm", "deepspeed", "copy"):
            line = _series(rows, op="all_reduce", ranks=ranks, backend=backend, dtype=dtypes[0])
            if line:
                bw_ax.plot([r["bytes"] for r in line], [r["busbw_GBps"] for r in line], marker="o",
                           label=f"{backend} {ranks} ranks {dtypes[0]}")
    ratio_ax.axhline(1.0, color="grey", linewidth=0.8)
    ratio_ax.set_title("plait shm / DeepSpeed (below 1: plait faster)")
    ratio_ax.set_ylabel("time ratio")
    bw_ax.set_title("all_reduce bus bandwidth (copy: bytes read + written)")
    bw_ax.set_ylabel("GB/s")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in (ratio_ax, bw_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    finish_figure(fig, "CPU collectives: plait shm vs gloo and DeepSpeed", path)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="CPU collectives: plait shm vs gloo and DeepSpeed, latency and "
                                                 "bandwidth")
    parser.add_argument("--ranks", type=int, nargs="+", default=None,
                        help="ranks (default 2 4); with --hosts, ranks per host (default 2)")
    parser.add_argument("--hosts", type=int, default=1,
                        help="above 1: plait's hierarchical all-reduce vs flat gloo over this many test hosts made "
                             "on this machine (needs root; see plait.bench._comm_hosts)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                        help="default float32 bfloat16; with --hosts, float32")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[parse_size(s) for s in DEFAULT_SIZES],
                        help="total message sizes, e.g. 4K 64K 32M (default 4K..64M)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=["all_reduce"])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--trial-s", type=float, default=0.05, help="target seconds per trial and backend")
    parser.add_argument("--no-deepspeed", action="store_true", help="leave DeepSpeed out even when installed")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON or PNG")
    args = parser.parse_args(argv)
    several = args.hosts > 1
    args.ranks = args.ranks or ([2] if several else [2, 4])
    args.dtypes = args.dtypes or (["float32"] if several else ["float32", "bfloat16"])
    if min(args.ranks) < (1 if several else 2) or args.trials < 1 or not args.trial_s > 0 or args.hosts < 1:
        parser.error("--ranks must be at least 2 (1 per host with --hosts), --hosts at least 1, --trials at least 1 "
                     "and --trial-s positive")
    if several:
        from plait.bench import _comm_hosts

        return _comm_hosts.main(args, argv)
    deepspeed = comm_deepspeed.available() and not args.no_deepspeed
    if not deepspeed:
        print("DeepSpeed: " + ("left out (--no-deepspeed)" if args.no_deepspeed else "not installed "
                               "(pip install deepspeed; `make bench` does) - comparing with gloo only"))
    load_before = os.getloadavg()
    rows, notes = [], {}
    for world in args.ranks:
        print(f"{world} ranks: {', '.join(args.ops)}, {', '.join(args.dtypes)} at {len(args.sizes)} sizes ...",
              flush=True)
        port = free_port()
        try:
            result = run_ranks(bench_rank, world, args.ops, args.dtypes, args.sizes, args.trials, args.trial_s,
                               deepspeed, timeout=3600, env={"MASTER_PORT": str(port)})[0]
        finally:
            if deepspeed:
                comm_deepspeed.remove_buffers("127.0.0.1", port)  # DeepSpeed leaves them behind
        rows += result["rows"]
        notes[world] = result["notes"]
    result = table(rows)
    print_table(result["columns"], result["rows"])
    goals = targets(rows)
    missed = [name for name, goal in goals.items() if not goal["met"]]
    if goals:
        print(f"issue #14 targets: {len(goals) - len(missed)} of {len(goals)} met")
        for name in missed:
            print(f"  missed: {name}: {goals[name]['value']} (bound {goals[name]['target']})")
    if not args.no_save:
        command = command_line("comm", argv)
        # Other processes on the machine slow every backend; the load average says how busy it was.
        path = write_result("comm", {"rows": rows, "table": result, "targets": goals, "trials": args.trials,
                                     "trial_s": args.trial_s, "dtypes": args.dtypes, "threads_per_rank": 1,
                                     "backend_notes": notes, "load_average_before": load_before,
                                     "load_average_after": os.getloadavg()},
                            command)
        print(f"wrote {path}")
        if plot(rows, path.with_suffix(".png")):
            print(f"wrote {path.with_suffix('.png')}")
        else:
            print("matplotlib is not installed: no PNG (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
