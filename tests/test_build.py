"""The build layer: plait._C's build facts and CUDA entry points, the package map, the CLI.

The extension is imported unconditionally: plait always builds it, so a missing or
broken plait._C fails here instead of being skipped.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from plait import _C

BUILD = _C.build_info()
CUDA_BUILT = BUILD["cuda"]
# torch may be a CPU build on a GPU machine, so also look for the driver's device node.
GPU_PRESENT = torch.cuda.is_available() or Path("/dev/nvidiactl").exists()
NO_CUDA_MESSAGE = "plait was built without CUDA"


def run_plait(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The plait command in a fresh interpreter, started outside the checkout."""
    return subprocess.run([sys.executable, "-m", "plait.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_build_info_has_every_key_with_sane_values() -> None:
    assert set(BUILD) == {"version", "compiler", "cxx_standard", "cuda", "cuda_version", "cuda_archs",
                          "simd", "openmp"}
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", BUILD["version"])
    assert re.fullmatch(r"(g|clang)\+\+ \d+\.\d+\.\d+", BUILD["compiler"])
    assert BUILD["cxx_standard"] in {"c++17", "c++20", "c++23"}
    assert BUILD["simd"] in {"avx512f", "avx2", "scalar"}
    assert BUILD["openmp"] is False
    if CUDA_BUILT:
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", BUILD["cuda_version"])
        assert BUILD["cuda_archs"] and all(re.fullmatch(r"sm_\d+[af]?", a) for a in BUILD["cuda_archs"])
    else:
        assert BUILD["cuda_version"] is None and BUILD["cuda_archs"] == []


def test_build_info_version_is_the_installed_version() -> None:
    try:
        installed = importlib.metadata.version("plait")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("plait is not installed as a distribution (e.g. run from PYTHONPATH)")
    assert BUILD["version"] == installed


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                    reason="reads x86 CPU flags from /proc/cpuinfo")
def test_simd_level_matches_cpu_flags() -> None:
    flags_line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    flags = set(flags_line.split(":", 1)[1].split())
    expected = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "scalar"
    assert BUILD["simd"] == expected


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH, so CUDA is not expected")
@pytest.mark.skipif(os.environ.get("PLAIT_CUDA") == "0", reason="PLAIT_CUDA=0 disables CUDA")
def test_cuda_sources_compiled_when_nvcc_is_on_path() -> None:
    assert CUDA_BUILT, "nvcc is on PATH but plait._C was built without CUDA"
    nvcc_out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True).stdout
    assert f"V{BUILD['cuda_version']}" in nvcc_out or f"release {BUILD['cuda_version']}" in nvcc_out
    if not os.environ.get("PLAIT_CUDA_ARCHS"):
        assert BUILD["cuda_archs"] == ["sm_80", "sm_90a"]


@pytest.mark.skipif(not CUDA_BUILT, reason="plait._C built without CUDA")
def test_cuda_runtime_version_is_the_toolkit_version() -> None:
    major, minor = (int(x) for x in BUILD["cuda_version"].split(".")[:2])
    assert _C.cuda_runtime_version() == major * 1000 + minor * 10


@pytest.mark.skipif(not CUDA_BUILT, reason="plait._C built without CUDA")
@pytest.mark.parametrize("n", [0, -1, 1 << 40])
def test_cuda_fill_check_rejects_bad_sizes(n: int) -> None:
    with pytest.raises(ValueError, match="n must be in"):
        _C.cuda_fill_check(n)


@pytest.mark.skipif(GPU_PRESENT, reason="a GPU is present")
def test_no_gpu_means_zero_devices() -> None:
    assert _C.cuda_device_count() == 0


@pytest.mark.skipif(GPU_PRESENT, reason="a GPU is present")
@pytest.mark.parametrize("call", [lambda: _C.cuda_device_name(0), lambda: _C.cuda_can_access_peer(0, 1),
                                  lambda: _C.cuda_fill_check(16)], ids=["device_name", "can_access_peer", "fill_check"])
def test_no_gpu_device_calls_raise_clear_errors(call: Callable[[], object]) -> None:
    # With CUDA compiled the message is the CUDA call plus cudaGetErrorString's text.
    expected = r"cuda\w+\(.*\) failed: \w+" if CUDA_BUILT else NO_CUDA_MESSAGE
    with pytest.raises(RuntimeError, match=expected):
        call()


@pytest.mark.skipif(CUDA_BUILT, reason="plait._C built with CUDA")
@pytest.mark.parametrize("name", ["cuda_runtime_version", "cuda_driver_version", "cuda_device_name",
                                  "cuda_can_access_peer", "cuda_fill_check"])
def test_without_cuda_every_call_but_device_count_says_how_to_rebuild(name: str) -> None:
    args = {"cuda_device_name": (0,), "cuda_can_access_peer": (0, 1), "cuda_fill_check": (16,)}.get(name, ())
    with pytest.raises(RuntimeError, match=f"{NO_CUDA_MESSAGE}.*rebuild with nvcc on PATH"):
        getattr(_C, name)(*args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")
def test_gpu_smoke() -> None:
    if not CUDA_BUILT:
        pytest.skip("plait._C was built without CUDA (PLAIT_CUDA=0 or no nvcc at build time)")
    torch.zeros(1, device="cuda")  # torch's CUDA runtime first: ours (static) must coexist with it
    assert _C.cuda_device_count() == torch.cuda.device_count()
    assert _C.cuda_device_name(0) == torch.cuda.get_device_name(0)
    assert _C.cuda_driver_version() >= 1000
    assert _C.cuda_fill_check(1 << 20) is True
    if torch.cuda.device_count() >= 2:
        assert isinstance(_C.cuda_can_access_peer(0, 1), bool)


def test_package_map() -> None:
    import plait.bench.common
    import plait.kernels

    assert plait.kernels.HAVE_TRITON == (importlib.util.find_spec("triton") is not None)
    assert Path(plait.bench.common.__file__).name == "common.py"


def test_console_script_points_at_cli_main() -> None:
    try:
        scripts = importlib.metadata.distribution("plait").entry_points
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("plait is not installed as a distribution (e.g. run from PYTHONPATH)")
    assert [ep.value for ep in scripts if ep.group == "console_scripts" and ep.name == "plait"] == ["plait.cli:main"]


def test_plait_info_prints_build_info(tmp_path: Path) -> None:
    result = run_plait("info", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"torch      {torch.__version__}" in result.stdout
    for key in BUILD:
        assert re.search(rf"^\s+{key}\s", result.stdout, re.MULTILINE), f"{key} missing:\n{result.stdout}"
    assert BUILD["compiler"] in result.stdout


def test_plait_info_json_matches_the_extension(tmp_path: Path) -> None:
    result = run_plait("info", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["extension"]["build"] == BUILD
    assert info["torch"]["version"] == torch.__version__
    assert "backends" in info


def test_plait_bench_unknown_name_fails_and_lists_choices(tmp_path: Path) -> None:
    result = run_plait("bench", "no_such_benchmark", cwd=tmp_path)
    assert result.returncode != 0
    assert "unknown benchmark 'no_such_benchmark'" in result.stderr
    assert "available:" in result.stderr


def test_plait_bench_without_name_lists_choices(tmp_path: Path) -> None:
    from plait.cli import benchmark_names

    result = run_plait("bench", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "available:" in result.stdout
    assert "common" not in benchmark_names() and "report" not in benchmark_names()
    assert all(name in result.stdout for name in benchmark_names())
