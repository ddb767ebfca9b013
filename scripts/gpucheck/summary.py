"""Read the stages' logs and result files and write the one-screen summary.

Parsers take what the tools write (pytest's JUnit XML or its last line, compute-sanitizer's
``ERROR SUMMARY`` lines, the benchmark JSONs of ``bench/common.py``) and return numbers;
``*_lines`` functions turn one finished stage into summary lines. Ratios are computed here
from the benchmarks' rows, each as "plait / reference" in the direction where > 1 means
plait is faster, and shown as the median over rows with the range.
"""
from __future__ import annotations

import ast
import json
import re
import statistics
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gpucheck.runner import PASS, SKIP, Outcome

PYTEST_WORDS = {"passed": "passed", "failed": "failed", "error": "errors", "errors": "errors",
                "skipped": "skipped", "deselected": "deselected", "xfailed": "xfailed", "xpassed": "xpassed"}


def pytest_counts(junit: Path | None, log: Path | None) -> dict[str, int] | None:
    """passed/failed/errors/skipped from pytest's JUnit XML, else from its log's last summary line."""
    if junit is not None and junit.is_file():
        try:
            root = ET.parse(junit).getroot()
        except ET.ParseError:
            root = None
        if root is not None:
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
                    "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"]}
    if log is None or not log.is_file():
        return None
    for line in reversed(log.read_text(errors="replace").splitlines()):
        found = re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b", line)
        if found and re.search(r"\bin [\d.]+s\b", line):
            counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
            for number, word in found:
                key = PYTEST_WORDS[word]
                counts[key] = counts.get(key, 0) + int(number)
            return counts
    return None


def sanitizer_counts(log: Path | None) -> dict[str, int] | None:
    """Errors summed over every process compute-sanitizer checked (one ERROR SUMMARY line each)."""
    if log is None or not log.is_file():
        return None
    text = log.read_text(errors="replace")
    summaries = [int(n) for n in re.findall(r"^=+ ERROR SUMMARY: (\d+) errors?", text, re.M)]
    hazards = [int(n) for n in re.findall(r"^=+ RACECHECK SUMMARY: (\d+) hazards?", text, re.M)]
    return {"processes": len(summaries), "errors": sum(summaries), "hazards": sum(hazards)}


def spread(values: Iterable[float]) -> dict[str, float] | None:
    """Median, min, max and count of ``values``; None when there are none."""
    values = list(values)
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def gemm_ratios(doc: dict[str, Any]) -> dict[str, dict[str, float]]:
    """bench gemm: plait's TFLOP/s over cuBLAS (GEMM only), eager and torch.compile (fwd, fwd+bwd)."""
    pairs = {"fused GEMM / cuBLAS": ("plait_gemm_tflops", "cublas_tflops"),
             "fused / eager fwd": ("plait_tflops", "eager_tflops"),
             "fused / eager fwd+bwd": ("plait_fb_tflops", "eager_fb_tflops"),
             "fused / compile fwd": ("plait_tflops", "compile_tflops"),
             "fused / compile fwd+bwd": ("plait_fb_tflops", "compile_fb_tflops")}
    rows = doc["results"]["rows"]
    out = {}
    for label, (mine, theirs) in pairs.items():
        found = spread(r[mine] / r[theirs] for r in rows if mine in r and theirs in r)
        if found:
            out[label] = found
    return out


def comm_gpu_ratios(doc: dict[str, Any]) -> dict[str, dict[str, float] | str]:
    """bench comm_gpu: NCCL time over IPC time at equal size and ranks (only with a GPU per rank),
    the IPC latency at the smallest size and bus bandwidth at the largest, and the GEMM throughput
    kept beside the comm kernel."""
    rows = doc["results"]["rows"]
    ipc = {(r["world"], r["bytes"]): r for r in rows if r["backend"] == "ipc"}
    nccl = {(r["world"], r["bytes"]): r for r in rows if r["backend"] == "nccl"}
    out = {}
    shared = sorted(set(ipc) & set(nccl))
    out["IPC all-reduce / NCCL (speed)"] = (spread(nccl[k]["ms"] / ipc[k]["ms"] for k in shared) if shared else
                                            "n/a: NCCL needs a GPU per rank, these ranks shared one")
    for world in sorted({w for w, _ in ipc}):
        sizes = sorted(b for w, b in ipc if w == world)
        smallest, largest = ipc[(world, sizes[0])], ipc[(world, sizes[-1])]
        out[f"IPC {world} ranks: {sizes[0]} B latency ms"] = spread([smallest["ms"]])
        out[f"IPC {world} ranks: {sizes[-1]} B bus GB/s"] = spread([largest["bus_gb_s"]])
    beside = doc["results"].get("gemm_beside_comm")
    if beside:
        out["GEMM kept beside comm kernel"] = spread([beside["gemm_alone_ms"] / beside["gemm_beside_ms"]])
    return out


def tp_layers_ratios(doc: dict[str, Any]) -> dict[str, dict[str, float]]:
    """bench tp_layers: step time of chunked over fused, and of none over chunked."""
    rows = doc["results"]["rows"]
    out = {}
    fused = spread(r["chunked_ms"] / r["fused_ms"] for r in rows if "fused_ms" in r and "chunked_ms" in r)
    if fused:
        out["fused / chunked TP MLP (speed)"] = fused
    chunked = spread(r["none_ms"] / r["chunked_ms"] for r in rows if "none_ms" in r and "chunked_ms" in r)
    if chunked:
        out["chunked / none TP MLP (speed)"] = chunked
    return out


def format_spread(label: str, s: dict[str, float] | str) -> str:
    """'label: median (min-max, n rows)', or the note that stands in for figures that cannot exist."""
    if isinstance(s, str):
        return f"{label}: {s}"
    if s["n"] == 1:
        return f"{label}: {s['median']:.3g}"
    return f"{label}: {s['median']:.3g} median ({s['min']:.3g}-{s['max']:.3g}, {s['n']:g} rows)"


def bench_lines(outcome: Outcome, name: str, ratios) -> list[str]:
    """Key figures from the benchmark JSON named ``name-*.json`` among the stage's collected files."""
    docs = [f for f in outcome.files if f.name.startswith(f"{name}-") and f.suffix == ".json"]
    if not docs:
        return [] if outcome.status != PASS else [f"no {name} result file was written"]
    try:
        figures = ratios(json.loads(docs[-1].read_text()))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        return [f"{docs[-1].name}: cannot read ({type(exc).__name__}: {exc})"]
    return [format_spread(label, s) for label, s in figures.items()] or [f"{docs[-1].name}: no comparable rows"]


def pytest_lines(outcome: Outcome) -> list[str]:
    """Test counts, from the JUnit XML written beside the stage's log (``<name>.xml``)."""
    counts = pytest_counts(outcome.log.with_suffix(".xml"), outcome.log)
    if counts is None:
        return ["no pytest summary (see the log)"]
    return [", ".join(f"{v} {k}" for k, v in counts.items() if v or k in ("passed", "failed"))]


def sanitizer_lines(outcome: Outcome) -> list[str]:
    counts = sanitizer_counts(outcome.log)
    if not counts or not counts["processes"]:
        return ["no ERROR SUMMARY from compute-sanitizer (see the log)"]
    line = f"{counts['errors']} errors in {counts['processes']} processes"
    if counts["hazards"]:
        line += f", {counts['hazards']} race hazards"
    tests = pytest_counts(None, outcome.log)
    if tests:
        line += f"; tests: {tests['passed']} passed, {tests['failed'] + tests['errors']} failed"
    return [line]


# nvidia-smi's header, `nvcc --version`, `compute-sanitizer --version`
VERSION_PATTERNS = (("driver", r"Driver Version:\s*([\d.]+)"), ("nvcc", r"release ([\d.]+)"),
                    ("compute-sanitizer", r"^Version (\S+)"))


def versions_lines(outcome: Outcome) -> list[str]:
    """Driver, nvcc, compute-sanitizer and Python package versions from the versions stage's log."""
    text = outcome.log.read_text(errors="replace")
    found = []
    for label, pattern in VERSION_PATTERNS:
        match = re.search(pattern, text, re.M)
        if match:
            found.append(f"{label} {match.group(1)}")
    found += [line for line in text.splitlines() if line.startswith("python ")][-1:]
    return [", ".join(found)] if found else []


def build_lines(outcome: Outcome) -> list[str]:
    """What `make build` says plait._C was built with: CUDA version and GPU targets."""
    for line in reversed(outcome.log.read_text(errors="replace").splitlines()):
        if line.startswith("   plait._C:"):
            try:
                info = ast.literal_eval(line.split(":", 1)[1].strip())
            except (ValueError, SyntaxError):
                return [line.strip()[:100]]
            if not info.get("cuda"):
                return ["plait._C built WITHOUT CUDA"]
            return [f"plait._C: CUDA {info.get('cuda_version')}, {', '.join(info.get('cuda_archs', []))}"]
    return []


def details(outcome: Outcome) -> list[str]:
    """The stage's own summary lines (none for a stage that never ran)."""
    return outcome.stage.report(outcome) if outcome.stage.report and outcome.log else []


def format_summary(outcomes: Sequence[Outcome], header: Sequence[str]) -> str:
    """The closing screen: header lines, one row per stage with its key figures, the verdict."""
    lines = [*header, "", f"{'stage':<16}{'status':<9}{'seconds':>8}{'limit':>7}  details"]
    for o in outcomes:
        first, *rest = ([o.reason] if o.reason else []) + details(o) or [""]
        lines.append(f"{o.stage.name:<16}{o.status:<9}{o.seconds:>8.1f}{o.stage.limit_s:>7g}  {first}")
        lines += [" " * 42 + d for d in rest]
    bad = [o for o in outcomes if o.status not in (PASS, SKIP)]
    total = sum(o.seconds for o in outcomes)
    verdict = "PASS" if not bad else f"FAIL ({', '.join(f'{o.stage.name} {o.status}' for o in bad)})"
    lines += ["", f"overall: {verdict} in {total:.0f} s"]
    return "\n".join(lines)
