"""Cost of PLAIT_CHECK_CALLS: a torch-backend all_reduce with and without its per-call agreement check.

    plait bench check_calls [--world 2] [--sizes 4096 65536 1048576 33554432] [--trials 7]

Each rank holds two communicators over the same process group, one checking every call
(``check_calls=True``, what ``PLAIT_CHECK_CALLS=1`` sets) and one not. Trials alternate
between them so that other load on the machine hits both alike; a trial times a run of
all_reduces (fp32, sum) and the figure is the median time per call over trials, on the
slowest rank. ``overhead`` is (checked - unchecked) / unchecked: the check is on by
default only where it stays under 5% of the call (:data:`plait.comm.agree.CHECK_CALLS_DEFAULT`).
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from plait.bench.common import bench_parser, command_line, print_table, ranks, repeats, size, write_result
from plait.launch import run_ranks

DEFAULT_SIZES = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 32 << 20]
TRIAL_S = 0.15  # target seconds per trial and mode


def bench_rank(rank: int, world: int, sizes: list[int], trials: int) -> list[dict]:
    import torch.distributed as dist

    import plait
    from plait.comm import TorchCommunicator

    torch.set_num_threads(1)
    plait.init_mesh(dp=world)
    comms = {}
    for checked in (False, True):
        comms[checked] = TorchCommunicator(None, name="world")
        comms[checked].check_calls = checked
    rows = []
    for nbytes in sizes:
        tensor = torch.ones(nbytes // 4)
        start = time.perf_counter()
        comms[False].all_reduce(tensor)
        reps = max(3, min(200, int(TRIAL_S / max(time.perf_counter() - start, 1e-4))))
        reps = _agree_max(comms[False], reps)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(trials):
            for checked in (False, True):
                comms[checked].barrier()
                start = time.perf_counter()
                for _ in range(reps):
                    comms[checked].all_reduce(tensor)
                times[checked].append((time.perf_counter() - start) / reps)
        rows.append({"bytes": nbytes, "reps": reps, "unchecked_ms": statistics.median(times[False]) * 1e3,
                     "checked_ms": statistics.median(times[True]) * 1e3})
    dist.barrier()
    plait.destroy_mesh()
    return rows


def _agree_max(comm, value: int) -> int:
    """The largest `value` over the ranks, so that every rank runs the same number of calls."""
    return int(comm.all_reduce(torch.tensor([value]), op="max").item())


def main(argv=None) -> int:
    parser = bench_parser("check_calls", "cost of PLAIT_CHECK_CALLS on the torch backend (gloo)")
    parser.add_argument("--world", type=ranks(), default=2, help="ranks (processes)")
    parser.add_argument("--sizes", type=size(), nargs="+", default=None, metavar="BYTES",
                        help="all_reduce sizes in bytes (default 4 KB .. 32 MB)")
    parser.add_argument("--trials", type=repeats(), default=7)
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    sizes = args.sizes or DEFAULT_SIZES
    if args.world < 2:
        parser.error("--world must be at least 2: one rank has nothing to check")
    if any(n % 4 for n in sizes):
        parser.error(f"--sizes must be multiples of 4 bytes (fp32 elements), got {sizes}")
    per_rank = run_ranks(bench_rank, args.world, sizes, args.trials, timeout=1200)
    rows = []
    for i, nbytes in enumerate(sizes):
        unchecked = max(r[i]["unchecked_ms"] for r in per_rank)
        checked = max(r[i]["checked_ms"] for r in per_rank)
        rows.append({"bytes": nbytes, "unchecked_ms": unchecked, "checked_ms": checked,
                     "check_ms": checked - unchecked, "overhead": (checked - unchecked) / unchecked})
    header = ["bytes", "unchecked ms", "checked ms", "check ms", "overhead"]
    table = [[r["bytes"], round(r["unchecked_ms"], 3), round(r["checked_ms"], 3), round(r["check_ms"], 3),
              f"{r['overhead']:.1%}"] for r in rows]
    print_table(header, table)
    if args.no_save:
        return 0
    path = write_result("check_calls", {"world": args.world, "backend": "gloo", "op": "all_reduce fp32 sum",
                                        "trials": args.trials, "rows": rows,
                                        "table": {"columns": header, "rows": table}},
                        command_line("check_calls", argv))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
