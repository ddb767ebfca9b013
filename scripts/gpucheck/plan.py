"""plait's GPU check as data: how to find the GPU, and the stages with their commands and limits.

The default limits add up to under 8 minutes (the check must fit a short GPU loan on an
H100 or H200); ``--limit NAME=SECONDS`` changes one. Every stage caches Triton's autotuning
results on disk (``TRITON_CACHE_AUTOTUNING=1``), so the GEMM shapes the GPU tests tuned are
not tuned again by later stages, least of all under the sanitizers. The sanitizer stages
run the IPC and fused tests at the small sizes those tests take from
``PLAIT_GPU_TEST_SIZES=small``, with PyTorch's caching allocator off so that an access past
a tensor's end reaches memory the sanitizer knows to be unallocated.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from gpucheck import summary
from gpucheck.runner import Stage

VENV_PYTHON = ".venv/bin/python"
BUDGET_S = 480                       # the whole check on an H100/H200
SANITIZER_TESTS = ("tests/test_comm_ipc_gpu.py::test_ipc_every_operation_exact[2]",
                   "tests/test_comm_ipc_gpu.py::test_ipc_tp_mlp_matches_dense",
                   "tests/test_fused_gpu.py::test_reduce_rows_is_bitwise_rank_order_sum[2]",
                   "tests/test_fused_gpu.py::test_fused_layers_match_dense[2]")
SERVE_TESTS = "tests/test_serve_gpu.py"     # its own stage, so the serving engine's result stands apart
DEFAULT_LIMITS = {"versions": 10, "build": 80, "pytest-gpu": 125, "serve-gpu": 40, "memcheck": 50, "racecheck": 50,
                  "bench-gemm": 55, "bench-comm-gpu": 35, "bench-tp-layers": 35}
EVERY_STAGE_ENV = {"TRITON_CACHE_AUTOTUNING": "1", "PYTHONUNBUFFERED": "1"}

PROBE = """
import json, torch
ok = torch.cuda.is_available() and torch.cuda.device_count() > 0
print(json.dumps({"count": torch.cuda.device_count() if ok else 0, "torch": torch.__version__,
                  "cuda": torch.version.cuda,
                  "name": torch.cuda.get_device_name(0) if ok else None,
                  "capability": list(torch.cuda.get_device_capability(0)) if ok else None}))
"""


@dataclass(frozen=True)
class Gpu:
    """The GPU the check runs on, as the build's torch sees it."""

    name: str
    capability: tuple[int, int]
    count: int
    torch: str
    cuda: str | None

    @property
    def arch(self) -> str:
        """nvcc target for PLAIT_CUDA_ARCHS: Hopper gets sm_90a (wgmma), others their own."""
        major, minor = self.capability
        return "90a" if (major, minor) == (9, 0) else f"{major}{minor}"


def detect_gpu(python: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> tuple[Gpu | None, str]:
    """The first CUDA GPU ``python``'s torch sees, or None and why not (cheap checks first)."""
    env = dict(os.environ if env is None else env)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return None, f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    if shutil.which("nvidia-smi", path=env.get("PATH")) is None and not Path("/dev/nvidiactl").exists():
        return None, "no NVIDIA driver: no nvidia-smi on PATH and no /dev/nvidiactl"
    try:
        done = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, env=env, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{python} could not ask torch: {exc}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"{python} cannot use torch: {last}"
    info = json.loads(done.stdout.strip().splitlines()[-1])
    if not info["count"]:
        return None, f"torch {info['torch']} (CUDA {info['cuda']}) sees no CUDA device"
    return Gpu(info["name"], tuple(info["capability"]), info["count"], info["torch"], info["cuda"]), ""


def find_sanitizer(env: dict[str, str] | None = None) -> str | None:
    """compute-sanitizer on PATH, else beside nvcc, in $CUDA_HOME/bin or in /usr/local/cuda/bin."""
    env = dict(os.environ if env is None else env)
    found = shutil.which("compute-sanitizer", path=env.get("PATH"))
    if found:
        return found
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    for directory in (Path(nvcc).resolve().parent if nvcc else None, env.get("CUDA_HOME") and
                      Path(env["CUDA_HOME"], "bin"), Path("/usr/local/cuda/bin")):
        candidate = Path(directory, "compute-sanitizer") if directory else None
        if candidate and candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


VERSIONS = 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, ' \
           '"triton", triton.__version__)'


def versions_stage(system_python: str, sanitizer: str | None, limit_s: float) -> Stage:
    """The driver, toolkit, sanitizer and Python packages the results depend on, into versions.log."""
    script = "; ".join(["nvidia-smi", "nvcc --version", f"{shlex.quote(sanitizer or 'compute-sanitizer')} --version",
                        f"{shlex.quote(system_python)} -c {shlex.quote(VERSIONS)}"])
    return Stage("versions", ("bash", "-c", script), limit_s, report=summary.versions_lines)


def sanitizer_stage(tool: str, sanitizer: str | None, python: str, limit_s: float) -> Stage:
    command = (sanitizer or "compute-sanitizer", "--tool", tool, "--target-processes", "all",
               "--require-cuda-init", "no", "--error-exitcode", "1",
               python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SANITIZER_TESTS)
    return Stage(tool, command, limit_s,
                 env={"PLAIT_GPU_TEST_SIZES": "small", "PYTORCH_NO_CUDA_MEMORY_CACHING": "1",
                      "PLAIT_TIMEOUT_S": "120"},
                 needs=("build",), report=summary.sanitizer_lines,
                 skip_reason=None if sanitizer else "compute-sanitizer not found on PATH, beside nvcc, in "
                                                    "$CUDA_HOME/bin or in /usr/local/cuda/bin")


def bench_stage(stage: str, name: str, args: tuple[str, ...], python: str, limit_s: float, ratios) -> Stage:
    return Stage(stage, (python, "-m", "plait", "bench", name, *args), limit_s, needs=("build",),
                 collect=(f"bench/results/{name}-*.json", f"bench/results/{name}-*.png"),
                 report=lambda outcome: summary.bench_lines(outcome, name, ratios))


def plait_stages(out_dir: Path, system_python: str, arch: str, sanitizer: str | None,
                 limits: dict[str, float] | None = None) -> list[Stage]:
    """The check, in order: versions, build, GPU tests, the serving engine on the GPU, two sanitizers, three
    benchmarks."""
    limit = {**DEFAULT_LIMITS, **(limits or {})}
    py = VENV_PYTHON
    junit = out_dir / "pytest-gpu.xml"
    stages = [
        versions_stage(system_python, sanitizer, limit["versions"]),
        Stage("build", ("make", "build", f"PYTHON={system_python}"), limit["build"],
              # offline: a missing optional extra must fail at once, not after pip's retries
              env={"PLAIT_CUDA": "1", "PLAIT_CUDA_ARCHS": arch, "PIP_NO_INDEX": "1"}, report=summary.build_lines),
        Stage("pytest-gpu", (py, "-m", "pytest", "tests", "-m", "gpu", f"--ignore={SERVE_TESTS}", "-q", "-rfE",
                             "--durations=10", "-p", "no:cacheprovider", f"--junitxml={junit}"),
              limit["pytest-gpu"], env={"PLAIT_TIMEOUT_S": "60"}, needs=("build",), report=summary.pytest_lines),
        Stage("serve-gpu", (py, "-m", "pytest", SERVE_TESTS, "-q", "-rfE", "-p", "no:cacheprovider",
                            f"--junitxml={out_dir / 'serve-gpu.xml'}"),
              limit["serve-gpu"], env={"PLAIT_TIMEOUT_S": "60"}, needs=("build",), report=summary.pytest_lines),
        sanitizer_stage("memcheck", sanitizer, py, limit["memcheck"]),
        sanitizer_stage("racecheck", sanitizer, py, limit["racecheck"]),
        bench_stage("bench-gemm", "gemm", ("--shard", "8b:2", "70b:8", "--tokens", "4096", "16384",
                                           "--warmup", "3", "--reps", "10"), py, limit["bench-gemm"],
                    summary.gemm_ratios),
        bench_stage("bench-comm-gpu", "comm_gpu", ("--world", "2", "4", "--max-mb", "16", "--warmup", "3",
                                                   "--iters", "10"), py, limit["bench-comm-gpu"],
                    summary.comm_gpu_ratios),
        bench_stage("bench-tp-layers", "tp_layers", ("--tp", "2", "4", "--tokens", "4096", "--hidden", "1024",
                                                     "--overlap", "none", "chunked", "fused"), py,
                    limit["bench-tp-layers"], summary.tp_layers_ratios),
    ]
    return [replace(s, env={**EVERY_STAGE_ENV, **s.env}) for s in stages]
