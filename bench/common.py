"""What every benchmark needs besides its own timing: the machine, the commit, the result file.

A result is written to ``<results dir>/<name>-<device slug>-<UTC date>.json`` as

    {"name", "device", "commit", "date", "command", "machine", "results"}

where ``results`` is the benchmark's own payload; when it holds
``"table": {"columns": [...], "rows": [[...], ...]}`` the README shows that table
(``bench/report.py``). The results dir is the checkout's ``bench/results``, found by
walking up from the working directory, or ``./plait-bench-results/`` outside a
checkout (an installed package). Nothing recorded names the host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from plait.argtypes import fraction, non_negative_int, positive_float, positive_int  # noqa: F401 (for benchmarks)
from plait.info import triton_version

FALLBACK_RESULTS_DIR = "plait-bench-results"
# Caps on benchmark arguments: beyond them a typo, not a benchmark (one host, minutes of run time).
MAX_RANKS = 64
MAX_SIZE = 1 << 20          # hidden sizes, tokens, rows, GEMM dims
MAX_REPEATS = 100_000       # warm-up and timed iterations, steps


def transformers_tp_available(who: str) -> bool:
    """Whether transformers' tensor parallelism (``tp_plan``) can run here: it needs ``accelerate``.
    Without it, says that ``who`` is skipped and why."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is not None:
        return True
    print(f"{who} skipped: transformers' tensor parallelism needs accelerate (pip install accelerate)", flush=True)
    return False


def bench_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The argument parser of benchmark `name`, named as users run it (``plait bench NAME``)."""
    return argparse.ArgumentParser(prog=f"plait bench {name}", description=description)


def ranks() -> Callable[[str], int]:
    """Type of a rank-count option: 1 .. MAX_RANKS local processes."""
    return positive_int(MAX_RANKS)


def size() -> Callable[[str], int]:
    """Type of a size option (hidden, tokens, rows, GEMM dims): 1 .. MAX_SIZE."""
    return positive_int(MAX_SIZE)


def repeats(minimum: int = 1) -> Callable[[str], int]:
    """Type of an iteration count: `minimum` (0 for warm-up) .. MAX_REPEATS."""
    return positive_int(MAX_REPEATS) if minimum >= 1 else non_negative_int(MAX_REPEATS)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else whatever `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name() -> str:
    """The GPU's name when torch sees one, else "cpu: <model>"."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu: {cpu_model()}"


def machine_info() -> dict[str, Any]:
    """Hardware and software versions a result depends on (no hostname)."""
    import torch

    return {
        "device": device_name(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version(),
        # other work on the machine skews timings: keep the 1/5/15-minute load with every result
        "load_average": list(os.getloadavg()),
    }


def checkout_root(start: Path | None = None) -> Path | None:
    """The nearest directory at or above `start` (default: cwd) that has bench/results."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        if (directory / "bench" / "results").is_dir():
            return directory
    return None


def results_dir(start: Path | None = None) -> Path:
    root = checkout_root(start)
    return root / "bench" / "results" if root else (start or Path.cwd()) / FALLBACK_RESULTS_DIR


def git_commit(start: Path | None = None) -> str | None:
    """HEAD of the checkout the results go to; None outside a checkout or without git."""
    root = checkout_root(start)
    if root is None:
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def slug(text: str) -> str:
    """'cpu: AMD EPYC 7B13' -> 'cpu-amd-epyc-7b13'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _to_json(value: Any) -> Any:
    """numpy and torch scalars and arrays, which json cannot write by itself."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to a result file: {value!r}")


def write_result(name: str, payload: dict[str, Any], command: str) -> Path:
    """Write one benchmark result (see the module docstring) and return its path.

    `command` is the command line that reproduces the result. A second run on the same
    device and UTC day replaces the file.
    """
    now = datetime.now(timezone.utc)
    machine = machine_info()
    document = {
        "name": name,
        "device": machine["device"],
        "commit": git_commit(),
        "date": now.isoformat(timespec="seconds"),
        "command": command,
        "machine": machine,
        "results": payload,
    }
    directory = results_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{slug(machine['device'])}-{now:%Y-%m-%d}.json"
    path.write_text(json.dumps(document, indent=2, default=_to_json) + "\n")
    return path


def command_line(name: str, argv: Optional[Sequence[str]]) -> str:
    """The command that reproduces a run, ``plait bench NAME ARGS`` (ARGS: ``argv``, else the
    process's own arguments), as recorded in each result."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["plait bench", name, *(shlex.quote(a) for a in args)])


def wall_times_ms(fn: Callable[[], Any], warmup: int, iters: int, barrier: Optional[Callable[[], Any]] = None,
                  sync: Optional[Callable[[], Any]] = None) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones.

    ``barrier`` (untimed) lines ranks up before each timed call; ``sync`` waits for queued
    device work before the clock starts and before it stops (CUDA).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if barrier is not None:
            barrier()
        if sync is not None:
            sync()
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def print_table(columns: Sequence[Any], rows: Sequence[Sequence[Any]]) -> None:
    """Print ``rows`` under ``columns``, each column right-aligned to its widest cell."""
    widths = [max(len(str(c)) for c in col) for col in zip(columns, *rows)]
    for line in [columns, *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(line, widths)))


def _status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


class PeakResident:
    """Peak resident memory increase of this process over a block (Linux), in bytes.

        with PeakResident() as peak:
            load()
        peak.increase      # max RSS during the block minus RSS at its start

    Writing "5" to /proc/self/clear_refs resets the high-water mark (VmHWM) to the
    current RSS, so the peak is the block's own, not that of whatever ran before.
    RSS counts file pages mapped at the time (a memory-mapped checkpoint) as well as
    anonymous memory: both are what the rank holds.
    """

    def __enter__(self) -> "PeakResident":
        Path("/proc/self/clear_refs").write_text("5")
        self.start = _status_bytes("VmRSS")
        self.peak = self.end = self.start
        return self

    def __exit__(self, *exc) -> None:
        self.peak = _status_bytes("VmHWM")
        self.end = _status_bytes("VmRSS")

    @property
    def increase(self) -> int:
        return self.peak - self.start

    def increase_so_far(self) -> int:
        """The peak increase from the block's start until now (inside the block)."""
        return _status_bytes("VmHWM") - self.start


def finish_figure(fig: Any, title: str, path: Path) -> None:
    """Title a matplotlib figure with ``title`` and this machine's CPU, lay it out, write it to ``path``, close it."""
    import matplotlib.pyplot as plt

    machine = machine_info()
    fig.suptitle(f"{title} ({machine['cpu']}, {machine['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_plot(plot, rows: Any, path: Path) -> None:
    """``plot(rows, path)`` (a function returning False without matplotlib), and say what came of it."""
    if plot(rows, path):
        print(f"wrote {path}")
    else:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
