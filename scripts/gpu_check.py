#!/usr/bin/env python3
"""Prove plait's CUDA half on one GPU in under 8 minutes: ``make gpu-check``.

    python3 scripts/gpu_check.py [--dry-run] [--out DIR] [--stages a,b] [--limit NAME=S ...]
                                 [--archive FILE.tar.gz]

Stages (scripts/gpucheck/plan.py), each with its own time limit; one that runs past it is
killed with its whole process group and marked TIMEOUT, and the next one runs:

  build            make build with this python's torch (offline), nvcc for this GPU only
  pytest-gpu       pytest -m gpu: kernels, IPC and fused tests (processes share the GPU)
  serve-gpu        tests/test_serve_gpu.py: plait.serve's engine and plait serve on the GPU (tp=1),
                   greedy tokens and log-probabilities against transformers
  memcheck         compute-sanitizer --tool memcheck on the IPC and fused tests, small sizes
  racecheck        compute-sanitizer --tool racecheck on the same
  bench-gemm       plait bench gemm: a Llama-3 8B and a 70B TP shard, 4096 and 16384 tokens
  bench-comm-gpu   plait bench comm_gpu: IPC all-reduce sweep, GEMM beside the comm kernel
  bench-tp-layers  plait bench tp_layers: overlap none / chunked / fused

Every log, the pytest JUnit XML, the benchmark JSONs (also left in bench/results/ for
bench/report.py) and summary.txt / summary.json go into one folder: ``--out``, else
$PLAIT_GPU_CHECK_OUT, else gpu-check-results/<UTC date-time>-<commit>/. Without a CUDA GPU
it prints one line and exits 0. Exit code 1 when any stage failed or timed out.
Needs only the standard library; the GPU is found through this interpreter's torch. In a
copy of the tree without .git, $PLAIT_GPU_CHECK_COMMIT names the commit in the folder name.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpucheck import plan  # noqa: E402
from gpucheck.runner import PASS, SKIP, Outcome, Stage, run_stages  # noqa: E402
from gpucheck.summary import details, format_summary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def commit(root: Path) -> str:
    """Short HEAD of the checkout, else $PLAIT_GPU_CHECK_COMMIT (a copy without .git), else 'nocommit'."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get("PLAIT_GPU_CHECK_COMMIT", "nocommit")


def parse_limits(items: Sequence[str]) -> dict[str, float]:
    limits = {}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in plan.DEFAULT_LIMITS or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"gpu-check: --limit {item!r}: write NAME=SECONDS with NAME one of "
                             f"{', '.join(plan.DEFAULT_LIMITS)}")
        limits[name] = float(seconds)
    return limits


def select(stages: list[Stage], names: str | None) -> list[Stage]:
    if not names:
        return stages
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {s.name for s in stages})
    if unknown:
        raise SystemExit(f"gpu-check: unknown stage(s) {unknown}; stages: {', '.join(s.name for s in stages)}")
    return [s for s in stages if s.name in wanted]


def dry_run(stages: Sequence[Stage], out_dir: Path) -> None:
    print(f"gpu-check dry run: {len(stages)} stages, limits {sum(s.limit_s for s in stages):g} s in all; "
          f"results would go to {out_dir}")
    for stage in stages:
        extra = (f" [needs {', '.join(stage.needs)}]" if stage.needs else "") + \
                (f" [SKIP: {stage.skip_reason}]" if stage.skip_reason else "")
        print(f"  {stage.name:<16} limit {stage.limit_s:>4g} s{extra}\n      $ {stage.shell_line()}")


def write_records(outcomes: Sequence[Outcome], out_dir: Path, header: dict, screen: str) -> None:
    """summary.txt (the screen) and summary.json (each stage's status, time, command, details)."""
    (out_dir / "summary.txt").write_text(screen + "\n")
    stages = [{"name": o.stage.name, "status": o.status, "seconds": round(o.seconds, 2), "limit_s": o.stage.limit_s,
               "command": o.stage.shell_line(), "reason": o.reason,
               "details": details(o),
               "files": [f.name for f in o.files]} for o in outcomes]
    ok = all(o.status in (PASS, SKIP) for o in outcomes)
    (out_dir / "summary.json").write_text(json.dumps({**header, "stages": stages, "passed": ok}, indent=2) + "\n")


def run_check(stages: Sequence[Stage], out_dir: Path, header: dict, cwd: Path = ROOT, grace_s: float = 3.0,
              archive: Path | None = None) -> int:
    """Run the stages, print and record the summary; 0 when none failed or timed out."""
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check: {header.get('device', '?')}, commit {header.get('commit', '?')}, results in {out_dir}",
          flush=True)
    outcomes = run_stages(stages, out_dir, cwd, grace_s=grace_s, progress=lambda line: print(line, flush=True))
    for o in outcomes:
        if o.status not in (PASS, SKIP) and o.log is not None:
            tail = o.log.read_text(errors="replace").splitlines()[-8:]
            print(f"\n--- last lines of {o.log} ---\n" + "\n".join(tail))
    lines = [f"plait gpu-check · {header.get('device', '?')} · commit {header.get('commit', '?')} · "
             f"{header.get('date', '?')}", f"results: {out_dir}"]
    screen = format_summary(outcomes, lines)
    print("\n" + screen)
    write_records(outcomes, out_dir, header, screen)
    if archive is not None:
        archive.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(out_dir, arcname=out_dir.name)
        print(f"archive: {archive}")
    return 0 if all(o.status in (PASS, SKIP) for o in outcomes) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build, test, sanitize and benchmark plait on one CUDA GPU")
    parser.add_argument("--dry-run", action="store_true", help="list the stages, commands and limits; run nothing")
    parser.add_argument("--out", type=Path, default=os.environ.get("PLAIT_GPU_CHECK_OUT"),
                        help="results folder (default $PLAIT_GPU_CHECK_OUT, else gpu-check-results/<date>-<commit>)")
    parser.add_argument("--stages", help="comma-separated subset of the stages to run, e.g. bench-gemm,racecheck")
    parser.add_argument("--limit", action="append", default=[], metavar="NAME=SECONDS",
                        help="change one stage's time limit (repeatable)")
    parser.add_argument("--archive", type=Path, help="also pack the results folder into this .tar.gz")
    parser.add_argument("--arch", help="nvcc target(s) for PLAIT_CUDA_ARCHS (default: the GPU's own, 90a on Hopper)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter with the system's torch to build against (default: this one)")
    args = parser.parse_args(argv)
    now = datetime.now(timezone.utc)
    head = commit(ROOT)
    out_dir = (args.out or ROOT / "gpu-check-results" / f"{now:%Y%m%d-%H%M%S}-{head}").resolve()
    limits = parse_limits(args.limit)
    sanitizer = plan.find_sanitizer()
    if args.dry_run:
        stages = plan.plait_stages(out_dir, args.python, args.arch or "90a", sanitizer, limits)
        dry_run(select(stages, args.stages), out_dir)
        if not args.arch:
            print("  (PLAIT_CUDA_ARCHS is the GPU's own target when it runs: 90a on an H100/H200)")
        return 0
    gpu, why = plan.detect_gpu(args.python)
    if gpu is None:
        print(f"gpu-check: no CUDA GPU found ({why}); nothing to check")
        return 0
    stages = select(plan.plait_stages(out_dir, args.python, args.arch or gpu.arch, sanitizer, limits), args.stages)
    header = {"device": f"{gpu.name} (sm_{gpu.capability[0]}{gpu.capability[1]}, {gpu.count} visible)",
              "commit": head, "date": now.isoformat(timespec="seconds"), "torch": gpu.torch, "cuda": gpu.cuda,
              "sanitizer": sanitizer}
    return run_check(stages, out_dir, header, archive=args.archive)


if __name__ == "__main__":
    sys.exit(main())
