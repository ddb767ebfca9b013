"""scripts/gpu_check.py (``make gpu-check``) on a machine without a GPU: the one-line exit, the
dry run, the stage runner's time limits on fake stages, and the summary's parsers on inputs
made here (expected figures are computed from those inputs)."""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402
from gpucheck import plan, summary  # noqa: E402
from gpucheck.runner import FAIL, PASS, SKIP, TIMEOUT, Outcome, Stage, run_stages  # noqa: E402

NO_GPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def _script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, env=env or NO_GPU_ENV, timeout=120)


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "gpu-check", f"PYTHON={sys.executable}", *args], cwd=ROOT,
                          capture_output=True, text=True, env=NO_GPU_ENV, timeout=120)


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


# ---------------------------------------------------------------- without a GPU


@pytest.mark.parametrize("how", ["script", "make"])
def test_without_a_gpu_one_line_and_exit_0(how: str, tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = _script("--out", str(out)) if how == "script" else _make(f"GPU_CHECK_ARGS=--out {out}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [done.stdout.strip()] and "no CUDA GPU found" in done.stdout, done.stdout
    assert done.stderr == "" and not out.exists()


def test_detect_gpu_reads_torchs_answer(tmp_path: Path) -> None:
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\n")
    answers = {"none": {"count": 0, "torch": "2.11.0", "cuda": "13.0", "name": None, "capability": None},
               "h200": {"count": 1, "torch": "2.11.0", "cuda": "13.0", "name": "NVIDIA H200", "capability": [9, 0]},
               "a100": {"count": 2, "torch": "2.11.0", "cuda": "13.0", "name": "NVIDIA A100", "capability": [8, 0]}}
    for name, answer in answers.items():
        (tmp_path / name).write_text(f"#!/bin/sh\necho '{json.dumps(answer)}'\n")
    (tmp_path / "broken").write_text("#!/bin/sh\necho 'ModuleNotFoundError: torch' >&2\nexit 1\n")
    for path in tmp_path.iterdir():
        path.chmod(0o755)
    env = {"PATH": str(tmp_path)}
    gpu, why = plan.detect_gpu(str(tmp_path / "none"), env)
    assert gpu is None and "sees no CUDA device" in why
    gpu, why = plan.detect_gpu(str(tmp_path / "broken"), env)
    assert gpu is None and "ModuleNotFoundError: torch" in why
    gpu, _ = plan.detect_gpu(str(tmp_path / "h200"), env)
    assert gpu is not None and gpu.name == "NVIDIA H200" and gpu.arch == "90a"
    gpu, _ = plan.detect_gpu(str(tmp_path / "a100"), env)
    assert gpu is not None and gpu.count == 2 and gpu.arch == "80"
    gpu, why = plan.detect_gpu(str(tmp_path / "h200"), {**env, "CUDA_VISIBLE_DEVICES": "-1"})
    assert gpu is None and "CUDA_VISIBLE_DEVICES" in why


def test_find_sanitizer_beside_nvcc_or_in_cuda_home(tmp_path: Path) -> None:
    toolkit, on_path, home = tmp_path / "cuda-13.0" / "bin", tmp_path / "path", tmp_path / "home"
    for directory in (toolkit, on_path, home / "bin"):
        directory.mkdir(parents=True)
    for tool in (toolkit / "nvcc", toolkit / "compute-sanitizer", home / "bin" / "compute-sanitizer"):
        tool.write_text("#!/bin/sh\n")
        tool.chmod(0o755)
    (on_path / "nvcc").symlink_to(toolkit / "nvcc")
    assert plan.find_sanitizer({"PATH": str(on_path)}) == str(toolkit / "compute-sanitizer")
    assert plan.find_sanitizer({"PATH": str(tmp_path), "CUDA_HOME": str(home)}) == str(home / "bin" / "compute-sanitizer")
    if not Path("/usr/local/cuda/bin/compute-sanitizer").exists():
        assert plan.find_sanitizer({"PATH": str(tmp_path)}) is None


# ---------------------------------------------------------------- dry run and plan


@pytest.mark.parametrize("how", ["script", "make"])
def test_dry_run_lists_stages_commands_and_limits(how: str, tmp_path: Path) -> None:
    out = tmp_path / "results"
    args = f"--out {out} --limit memcheck=33"
    done = _script(*args.split(), "--dry-run") if how == "script" else _make("DRY_RUN=1", f"GPU_CHECK_ARGS={args}")
    assert done.returncode == 0, done.stderr
    limits = {**plan.DEFAULT_LIMITS, "memcheck": 33}
    text = done.stdout
    for name, seconds in limits.items():
        assert any(line.split()[:3] == [name, "limit", f"{seconds:g}"] for line in text.splitlines()), (name, text)
    assert f"limits {sum(limits.values()):g} s in all" in text
    for fragment in ("make build", "PIP_NO_INDEX=1", "-m pytest tests -m gpu", "tests/test_serve_gpu.py", "--tool memcheck", "--tool racecheck",
                     "--target-processes all", "PLAIT_GPU_TEST_SIZES=small", "bench gemm --shard 8b:2 70b:8",
                     "--tokens 4096 16384", "bench comm_gpu", "bench tp_layers", "--overlap none chunked fused"):
        assert fragment in text, fragment
    assert not out.exists()


def test_default_limits_fit_the_budget_and_every_stage_has_one(tmp_path: Path) -> None:
    stages = plan.plait_stages(tmp_path, "python3", "90a", "/usr/local/cuda/bin/compute-sanitizer")
    assert [s.name for s in stages] == list(plan.DEFAULT_LIMITS)
    assert sum(s.limit_s for s in stages) <= plan.BUDGET_S
    names = [s.name for s in stages]
    assert all(s.needs == ("build",) for s in stages[names.index("build") + 1:])
    assert all(s.skip_reason is None for s in stages)
    missing = plan.plait_stages(tmp_path, "python3", "90a", None)
    assert [s.name for s in missing if s.skip_reason] == ["memcheck", "racecheck"]


def test_the_sanitizer_stages_name_tests_that_exist() -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                           *plan.SANITIZER_TESTS], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(plan.SANITIZER_TESTS)} tests collected" in done.stdout


def test_bad_limit_and_unknown_stage_are_refused() -> None:
    for args in (["--limit", "memcheck=soon"], ["--limit", "nope=5"], ["--stages", "build,nope"]):
        done = _script("--dry-run", *args)
        assert done.returncode != 0 and "gpu-check:" in done.stderr and "Traceback" not in done.stderr, args


# ---------------------------------------------------------------- the stage runner


def test_a_stage_past_its_limit_is_killed_with_its_children_and_the_next_runs(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    stages = [Stage("first", _python("print('one')"), 30),
              Stage("hangs", ("bash", "-c", f"sleep 120 & echo $! > {pid_file}; wait"), 1.5),
              Stage("after", _python("print('after the hang')"), 30)]
    lines: list[str] = []
    outcomes = run_stages(stages, tmp_path / "out", tmp_path, grace_s=0.5, progress=lines.append)
    assert [o.status for o in outcomes] == [PASS, TIMEOUT, PASS]
    hung = outcomes[1]
    assert 1.5 <= hung.seconds < 10 and "1.5 s limit" in hung.reason
    assert not _alive(int(pid_file.read_text()))
    assert "after the hang" in outcomes[2].log.read_text()
    assert any("hangs: TIMEOUT" in line for line in lines)


def test_sigint_lets_a_stage_write_its_report_before_it_dies(tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    code = (f"import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
            f"    open({str(report)!r}, 'w').write('interrupted')\n    raise")
    [outcome] = run_stages([Stage("slow", _python(code), 1)], tmp_path / "out", tmp_path, grace_s=5,
                           progress=lambda _: None)
    assert outcome.status == TIMEOUT and report.read_text() == "interrupted"


def test_failed_needs_and_missing_tools_skip_stages(tmp_path: Path) -> None:
    stages = [Stage("build", _python("import sys; sys.exit(3)"), 30),
              Stage("tests", _python("print('never')"), 30, needs=("build",)),
              Stage("sanitizer", ("no-such-tool",), 30, skip_reason="no-such-tool not found"),
              Stage("independent", _python("print('runs')"), 30),
              Stage("missing", ("/no/such/program",), 30)]
    outcomes = run_stages(stages, tmp_path / "out", tmp_path, progress=lambda _: None)
    assert [o.status for o in outcomes] == [FAIL, SKIP, SKIP, PASS, FAIL]
    assert outcomes[0].returncode == 3 and outcomes[0].reason == "exit code 3"
    assert outcomes[1].reason == "needs build (FAIL)" and outcomes[1].log is None
    assert outcomes[2].reason == "no-such-tool not found"
    assert "could not start" in outcomes[4].reason


def test_only_files_written_during_a_stage_are_collected(tmp_path: Path) -> None:
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    old = results / "gemm-old.json"
    old.write_text("{}")
    os.utime(old, (1_000_000, 1_000_000))
    write = f"open({str(results / 'gemm-new.json')!r}, 'w').write('{{}}')"
    [outcome] = run_stages([Stage("bench", _python(write), 30, collect=("bench/results/gemm-*.json",))],
                           tmp_path / "out", tmp_path, progress=lambda _: None)
    assert [f.name for f in outcome.files] == ["gemm-new.json"] and (tmp_path / "out" / "gemm-new.json").is_file()


# ---------------------------------------------------------------- parsers and summary


def _junit(path: Path, suites: list[dict[str, int]]) -> None:
    body = "".join(f'<testsuite name="s{i}" tests="{s["tests"]}" failures="{s["failures"]}" errors="{s["errors"]}" '
                   f'skipped="{s["skipped"]}"></testsuite>' for i, s in enumerate(suites))
    path.write_text(f'<?xml version="1.0"?><testsuites>{body}</testsuites>')


def test_pytest_counts_from_junit_and_from_the_log(tmp_path: Path) -> None:
    rng = random.Random(5)
    suites = []
    for _ in range(2):
        failures, errors, skipped, passed = (rng.randint(0, 9) for _ in range(4))
        suites.append(dict(tests=failures + errors + skipped + passed, failures=failures, errors=errors,
                           skipped=skipped))
    _junit(tmp_path / "r.xml", suites)
    want = {"failed": sum(s["failures"] for s in suites), "errors": sum(s["errors"] for s in suites),
            "skipped": sum(s["skipped"] for s in suites)}
    want["passed"] = sum(s["tests"] for s in suites) - sum(want.values())
    assert summary.pytest_counts(tmp_path / "r.xml", None) == want
    passed, failed, skipped = rng.randint(1, 99), rng.randint(1, 9), rng.randint(1, 9)
    log = tmp_path / "p.log"
    log.write_text(f"....F\nFAILED tests/x.py::t - 3 passed\n{failed} failed, {passed} passed, {skipped} skipped, "
                   f"1 error in 12.34s\n")
    assert summary.pytest_counts(tmp_path / "absent.xml", log) == {"passed": passed, "failed": failed,
                                                                   "errors": 1, "skipped": skipped}
    log.write_text("collected 3 items\n# TIMEOUT: killed\n")
    assert summary.pytest_counts(None, log) is None


def test_sanitizer_counts_add_up_every_process(tmp_path: Path) -> None:
    rng = random.Random(7)
    errors = [rng.randint(0, 4) for _ in range(3)]
    log = tmp_path / "memcheck.log"
    log.write_text("".join(f"========= Invalid __global__ read of size 4\n========= ERROR SUMMARY: {e} "
                           f"error{'s' if e != 1 else ''}\n" for e in errors)
                   + "========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n")
    assert summary.sanitizer_counts(log) == {"processes": 3, "errors": sum(errors), "hazards": 2}
    outcome = Outcome(Stage("memcheck", ("x",), 1), FAIL, log=log)
    assert summary.sanitizer_lines(outcome)[0].startswith(f"{sum(errors)} errors in 3 processes")


def test_versions_and_build_lines(tmp_path: Path) -> None:
    rng = random.Random(13)
    driver, sanitizer = f"580.{rng.randint(1, 999)}.04", f"2025.{rng.randint(1, 9)}.1.0"
    log = tmp_path / "versions.log"
    log.write_text(f"| NVIDIA-SMI 580.1  Driver Version: {driver}  CUDA Version: 13.0 |\n"
                   "Cuda compilation tools, release 13.0, V13.0.88\nNVIDIA (R) Compute Sanitizer\n"
                   f"Version {sanitizer} (build 36)\npython 3.12.3 torch 2.11.0+cu130 triton 3.6.0\n")
    outcome = Outcome(Stage("versions", ("x",), 1), PASS, log=log)
    assert summary.versions_lines(outcome) == [f"driver {driver}, nvcc 13.0, compute-sanitizer {sanitizer}, "
                                            "python 3.12.3 torch 2.11.0+cu130 triton 3.6.0"]
    log.write_text("   plait._C: {'cuda': False, 'cuda_archs': []}\n")
    assert summary.build_lines(Outcome(Stage("build", ("x",), 1), PASS, log=log)) == ["plait._C built WITHOUT CUDA"]


def _gemm_doc(rng: random.Random) -> dict:
    rows = []
    for tokens in (4096, 8192, 16384):
        row = {"model": "8b", "tp": 2, "tokens": tokens, "gemm": "up", "m": tokens, "n": 7168, "k": 4096}
        for name in ("cublas", "plait_gemm", "eager", "compile", "plait", "eager_fb", "compile_fb", "plait_fb"):
            row[f"{name}_tflops"] = rng.uniform(100, 800)
        rows.append(row)
    return {"name": "gemm", "results": {"rows": rows}}


def _comm_doc(rng: random.Random, nccl: bool) -> dict:
    rows = [dict(backend=b, world=w, bytes=s, ms=rng.uniform(0.01, 2), bus_gb_s=rng.uniform(1, 400))
            for b in (("ipc", "nccl") if nccl else ("ipc",)) for w in (2, 4) for s in (4096, 1 << 20, 16 << 20)]
    beside = {"gemm_alone_ms": rng.uniform(1, 2), "gemm_beside_ms": rng.uniform(1, 3)}
    return {"name": "comm_gpu", "results": {"rows": rows, "gemm_beside_comm": beside}}


def _tp_doc(rng: random.Random) -> dict:
    rows = [dict(tp=tp, sp=sp, none_ms=rng.uniform(1, 9), chunked_ms=rng.uniform(1, 9), fused_ms=rng.uniform(1, 9))
            for tp in (2, 4) for sp in (False, True)]
    return {"name": "tp_layers", "results": {"rows": rows}}


def test_benchmark_ratios_are_computed_from_the_rows() -> None:
    rng = random.Random(11)
    gemm = _gemm_doc(rng)
    rows = gemm["results"]["rows"]
    got = summary.gemm_ratios(gemm)
    assert got["fused GEMM / cuBLAS"]["median"] == pytest.approx(
        statistics.median(r["plait_gemm_tflops"] / r["cublas_tflops"] for r in rows))
    assert got["fused / compile fwd+bwd"]["min"] == pytest.approx(
        min(r["plait_fb_tflops"] / r["compile_fb_tflops"] for r in rows))
    assert got["fused / eager fwd"]["n"] == len(rows)

    comm = _comm_doc(rng, nccl=True)
    by = {(r["backend"], r["world"], r["bytes"]): r for r in comm["results"]["rows"]}
    got = summary.comm_gpu_ratios(comm)
    want = statistics.median(by[("nccl", w, s)]["ms"] / by[("ipc", w, s)]["ms"]
                             for w in (2, 4) for s in (4096, 1 << 20, 16 << 20))
    assert got["IPC all-reduce / NCCL (speed)"]["median"] == pytest.approx(want)
    assert got["IPC 4 ranks: 4096 B latency ms"]["median"] == by[("ipc", 4, 4096)]["ms"]
    assert got["IPC 2 ranks: 16777216 B bus GB/s"]["median"] == by[("ipc", 2, 16 << 20)]["bus_gb_s"]
    beside = comm["results"]["gemm_beside_comm"]
    assert got["GEMM kept beside comm kernel"]["median"] == pytest.approx(
        beside["gemm_alone_ms"] / beside["gemm_beside_ms"])
    assert summary.comm_gpu_ratios(_comm_doc(rng, nccl=False))["IPC all-reduce / NCCL (speed)"].startswith("n/a")

    tp = _tp_doc(rng)
    got = summary.tp_layers_ratios(tp)
    tp_rows = tp["results"]["rows"]
    assert got["fused / chunked TP MLP (speed)"]["median"] == pytest.approx(
        statistics.median(r["chunked_ms"] / r["fused_ms"] for r in tp_rows))
    assert got["chunked / none TP MLP (speed)"]["max"] == pytest.approx(
        max(r["none_ms"] / r["chunked_ms"] for r in tp_rows))


def test_run_check_summarizes_records_and_fails_on_any_failed_stage(tmp_path: Path, capsys) -> None:
    rng = random.Random(3)
    doc = _tp_doc(rng)
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    target = results / "tp_layers-fake-gpu-2026-12-02.json"
    write = f"import json; json.dump({doc!r}, open({str(target)!r}, 'w'))"
    ratio = statistics.median(r["chunked_ms"] / r["fused_ms"] for r in doc["results"]["rows"])
    bench = plan.bench_stage("bench-tp-layers", "tp_layers", (), "python", 30, summary.tp_layers_ratios)
    built = {"cuda": True, "cuda_version": "13.0.88", "cuda_archs": ["sm_90a"]}
    stages = [Stage("build", _python(f"print('   plait._C:', {built!r})"), 30, report=summary.build_lines),
              Stage("bench-tp-layers", _python(write), 30, needs=("build",), collect=bench.collect,
                    report=bench.report),
              Stage("pytest-gpu", _python("print('2 failed, 5 passed in 1.0s'); raise SystemExit(1)"), 30,
                    report=summary.pytest_lines)]
    out = tmp_path / "out"
    archive = tmp_path / "check.tar.gz"
    rc = gpu_check.run_check(stages, out, {"device": "Fake GPU", "commit": "abc1234", "date": "today"}, cwd=tmp_path,
                             archive=archive)
    screen = capsys.readouterr().out
    assert rc == 1
    assert f"fused / chunked TP MLP (speed): {ratio:.3g} median" in screen
    assert "plait._C: CUDA 13.0.88, sm_90a" in screen
    assert "2 failed" in screen and "overall: FAIL (pytest-gpu FAIL)" in screen and "Fake GPU" in screen
    record = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in record["stages"]] == [PASS, PASS, FAIL] and record["passed"] is False
    assert record["stages"][1]["files"] == [target.name] and (out / target.name).is_file()
    assert (out / "summary.txt").read_text().strip() in screen
    with tarfile.open(archive) as tar:
        assert f"out/{target.name}" in tar.getnames() and "out/build.log" in tar.getnames()
