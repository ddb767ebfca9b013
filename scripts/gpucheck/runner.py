"""Run a list of stages, each in its own process group under its own time limit.

A stage is a command with a limit. Its output goes to ``<out>/<name>.log``; when it runs
past its limit its whole process group is stopped (SIGINT first, so pytest still writes
its report, then SIGTERM, then SIGKILL) and it is marked TIMEOUT, and the next stage
runs. A stage whose ``needs`` did not PASS is SKIPped, and so is one that carries a
``skip_reason`` (a tool it needs is missing). Nothing here knows about plait: the stages
are data (``scripts/gpucheck/plan.py`` makes plait's), so tests drive this with fakes.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PASS, FAIL, TIMEOUT, SKIP = "PASS", "FAIL", "TIMEOUT", "SKIP"


@dataclass(frozen=True)
class Stage:
    """One step of the check.

    ``collect``: glob patterns (relative to the working directory) of files the stage
    writes elsewhere, e.g. ``bench/results/gemm-*.json``; those modified while it ran are
    copied into the output folder. ``report``: turns the finished stage into summary lines.
    """

    name: str
    command: tuple[str, ...]
    limit_s: float
    env: Mapping[str, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    skip_reason: str | None = None
    collect: tuple[str, ...] = ()
    report: Callable[["Outcome"], list[str]] | None = None

    def shell_line(self) -> str:
        """The command as one copy-pasteable line, its extra environment first."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.command)


@dataclass
class Outcome:
    """What became of one stage."""

    stage: Stage
    status: str
    seconds: float = 0.0
    returncode: int | None = None
    log: Path | None = None
    reason: str = ""
    files: list[Path] = field(default_factory=list)


def stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """Stop ``proc``'s whole process group: SIGINT, then SIGTERM, then SIGKILL, ``grace_s`` apart."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace_s)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def _reap_group(pgid: int) -> None:
    """Kill what a finished stage left running in its group (spawned ranks, daemons)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def collect_files(patterns: Sequence[str], cwd: Path, since: float, dest: Path) -> list[Path]:
    """Copy files matching ``patterns`` under ``cwd`` and modified at or after ``since`` into ``dest``."""
    copied = []
    for pattern in patterns:
        for path in sorted(cwd.glob(pattern)):
            if path.is_file() and path.stat().st_mtime >= since:
                target = dest / path.name
                shutil.copy2(path, target)
                copied.append(target)
    return copied


def run_stage(stage: Stage, out_dir: Path, cwd: Path, env: Mapping[str, str], grace_s: float = 5.0) -> Outcome:
    """Run one stage to completion or to its limit; its output goes to ``out_dir/<name>.log``."""
    log = out_dir / f"{stage.name}.log"
    started_wall = time.time() - 1.0          # file systems round mtimes: be generous by a second
    start = time.monotonic()
    with log.open("w") as handle:
        handle.write(f"$ {stage.shell_line()}\n# limit {stage.limit_s:g} s, cwd {cwd}\n")
        handle.flush()
        try:
            proc = subprocess.Popen(stage.command, cwd=cwd, env={**env, **stage.env}, stdout=handle,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            handle.write(f"could not start: {exc}\n")
            return Outcome(stage, FAIL, time.monotonic() - start, None, log, f"could not start: {exc}")
        try:
            returncode = proc.wait(timeout=stage.limit_s)
            status = PASS if returncode == 0 else FAIL
            reason = "" if returncode == 0 else f"exit code {returncode}"
        except subprocess.TimeoutExpired:
            stop_group(proc, grace_s)
            returncode, status, reason = proc.returncode, TIMEOUT, f"killed after its {stage.limit_s:g} s limit"
            handle.write(f"\n# TIMEOUT: {reason}\n")
        finally:
            _reap_group(proc.pid)
    outcome = Outcome(stage, status, time.monotonic() - start, returncode, log, reason)
    outcome.files = collect_files(stage.collect, cwd, started_wall, out_dir)
    return outcome


def run_stages(stages: Sequence[Stage], out_dir: Path, cwd: Path, env: Mapping[str, str] | None = None,
               grace_s: float = 5.0, progress: Callable[[str], None] = print) -> list[Outcome]:
    """Run ``stages`` in order (see the module docstring); ``progress`` gets one line per stage."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if env is None else env)
    done: dict[str, Outcome] = {}
    outcomes = []
    for i, stage in enumerate(stages, 1):
        unmet = [n for n in stage.needs if n in done and done[n].status != PASS]
        if stage.skip_reason:
            outcome = Outcome(stage, SKIP, reason=stage.skip_reason)
        elif unmet:
            outcome = Outcome(stage, SKIP, reason="needs " + ", ".join(f"{n} ({done[n].status})" for n in unmet))
        else:
            progress(f"[{i}/{len(stages)}] {stage.name} (limit {stage.limit_s:g} s) ...")
            outcome = run_stage(stage, out_dir, cwd, env, grace_s)
        progress(f"[{i}/{len(stages)}] {stage.name}: {outcome.status} {outcome.seconds:.1f} s"
                 + (f" ({outcome.reason})" if outcome.reason else ""))
        done[stage.name] = outcome
        outcomes.append(outcome)
    return outcomes
