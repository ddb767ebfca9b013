"""Build script for plait: the package map and the compiled extension ``plait._C``.

pyproject.toml holds the metadata; this file holds what needs code.

Packages: ``python/plait`` is ``plait``, ``triton_kernels`` is ``plait.kernels`` and
``bench`` is ``plait.bench`` (``bench/results`` has no ``__init__.py`` and is not packaged).

Extension: one module, ``plait._C``, from every ``csrc/**/*.cpp`` (pybind11, C++17) and,
when nvcc is found, every ``csrc/**/*.cu``. It includes no torch headers: it takes raw
pointers and sizes, so building needs no torch and one build serves any torch version.
CUDA code is linked against the static CUDA runtime, so the module imports on machines
without a CUDA driver; the runtime's symbols are kept private to the module so they
cannot clash with the libcudart that torch loads.

Environment:
    PLAIT_CUDA=0         build without CUDA
    PLAIT_CUDA=1         require CUDA: fail when nvcc is not found
    (unset)              build CUDA code when nvcc is found
    PLAIT_CUDA_ARCHS     GPU targets instead of "sm_80,sm_90a", e.g. "90a" or "80;90a"
    CUDA_HOME            toolkit root (default: the toolkit that nvcc on PATH belongs to)

Objects are compiled in parallel by ninja when it is available (else one at a time) in
a fixed directory under build/, so a rebuild recompiles only what changed, also for
editable installs, whose own temporary build directory is discarded after each install.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = {"plait": "python/plait", "plait.kernels": "triton_kernels", "plait.bench": "bench"}
DEFAULT_CUDA_ARCHS = ("sm_80", "sm_90a")
CXX_FLAGS = ["-std=c++17", "-O3", "-fvisibility=hidden", "-Wall", "-Wextra"]
NVCC_FLAGS = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]
CUDA_LIBS = ["cudart_static", "dl", "rt", "pthread"]


def all_packages() -> list[str]:
    """The three mapped packages and every subpackage below them."""
    found = []
    for name, directory in PACKAGE_DIR.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(str(ROOT / directory))]
    return found


def csrc_sources(pattern: str) -> list[str]:
    """Paths (relative to the project root) of csrc files matching a glob, recursively."""
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob(pattern))


@dataclass(frozen=True)
class Cuda:
    """A CUDA toolkit to compile and link the .cu sources with."""

    nvcc: str
    lib_dir: Path
    version: str  # nvcc's full version, e.g. "13.0.88"
    archs: tuple[str, ...]  # e.g. ("sm_80", "sm_90a")

    def gencode_flags(self) -> list[str]:
        return [f"-gencode=arch=compute_{a[3:]},code={a}" for a in self.archs]


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME/CUDA_PATH, else PATH, else the usual /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and (Path(os.environ[var]) / "bin" / "nvcc").is_file():
            return str(Path(os.environ[var]) / "bin" / "nvcc")
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return shutil.which("nvcc") or (str(fallback) if fallback.is_file() else None)


def cuda_home(nvcc: str) -> Path:
    """The toolkit root. nvcc on PATH may be a wrapper script, so ask nvcc (its dry run names TOP)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True)
    top = re.search(r"^#\$ TOP=(.+)$", dry.stderr, re.MULTILINE)
    return Path(top.group(1).strip()).resolve() if top else Path(nvcc).resolve().parent.parent


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"V(\d+\.\d+\.\d+)", out) or re.search(r"release (\d+\.\d+)", out)
    if match is None:
        raise SystemExit(f"plait: cannot read the CUDA version from `{nvcc} --version`:\n{out}")
    return match.group(1)


def cuda_archs() -> tuple[str, ...]:
    raw = os.environ.get("PLAIT_CUDA_ARCHS", "").strip()
    if not raw:
        return DEFAULT_CUDA_ARCHS
    archs = tuple(a if a.startswith("sm_") else f"sm_{a}" for a in re.split(r"[;,\s]+", raw) if a)
    bad = [a for a in archs if not re.fullmatch(r"sm_\d+[af]?", a)]
    if bad:
        raise SystemExit(f"plait: PLAIT_CUDA_ARCHS={raw!r} has invalid targets {bad}; write e.g. '80;90a'")
    return archs


def find_cuda() -> Cuda | None:
    """The toolkit to use, or None to build without CUDA, following PLAIT_CUDA."""
    mode = os.environ.get("PLAIT_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise SystemExit(f"plait: PLAIT_CUDA must be 0, 1 or unset, not {mode!r}")
    if mode == "0":
        print("plait: PLAIT_CUDA=0, building without CUDA")
        return None
    nvcc = find_nvcc()
    if nvcc is None:
        if mode == "1":
            raise SystemExit("plait: PLAIT_CUDA=1 but nvcc was not found; put nvcc on PATH or set CUDA_HOME")
        print("plait: nvcc not found, building without CUDA (PLAIT_CUDA=1 makes this an error)")
        return None
    home = cuda_home(nvcc)
    candidates = (home / "lib64", home / "lib", home / "targets" / "x86_64-linux" / "lib")
    lib_dir = next((d for d in candidates if (d / "libcudart_static.a").is_file()), None)
    if lib_dir is None:
        raise SystemExit(f"plait: found {nvcc} but no libcudart_static.a under {home}; "
                         "set CUDA_HOME to the toolkit root, or PLAIT_CUDA=0 to build without CUDA")
    return Cuda(nvcc=nvcc, lib_dir=lib_dir, version=nvcc_version(nvcc), archs=cuda_archs())


@dataclass(frozen=True)
class Job:
    """One source to compile with one of the two rules, "cxx" or "nvcc"."""

    rule: str
    source: Path
    obj: Path


def find_ninja() -> str | None:
    """ninja on PATH, else the binary of the `ninja` Python package."""
    if shutil.which("ninja"):
        return shutil.which("ninja")
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return None
    binary = Path(ninja.BIN_DIR) / "ninja"
    return str(binary) if binary.is_file() else None


def ninja_escape(text: str) -> str:
    return text.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def write_ninja_file(path: Path, commands: dict[str, list[str]], jobs: list[Job]) -> None:
    """build.ninja with one rule per compiler; depfiles make header edits trigger rebuilds."""
    depfile_flags = {"cxx": "-MMD -MF $out.d",
                     "nvcc": "--generate-dependencies-with-compile --dependency-output $out.d"}
    lines = ["ninja_required_version = 1.3"]
    for rule, command in commands.items():
        lines += [f"{rule} = {shlex.join(command).replace('$', '$$')}",
                  f"rule {rule}",
                  f"  command = ${rule} {depfile_flags[rule]} -c $in -o $out",
                  "  depfile = $out.d",
                  "  deps = gcc",
                  f"  description = {rule.upper()} $in"]
    lines += [f"build {ninja_escape(str(j.obj))}: {j.rule} {ninja_escape(str(j.source))}" for j in jobs]
    path.write_text("\n".join(lines) + "\n")


def compile_all(commands: dict[str, list[str]], jobs: list[Job], build_dir: Path) -> None:
    try:
        _compile_all(commands, jobs, build_dir)
    except subprocess.CalledProcessError as exc:
        raise CompileError(f"plait: compiling plait._C failed (compiler output above): {exc}") from None


def _compile_all(commands: dict[str, list[str]], jobs: list[Job], build_dir: Path) -> None:
    for job in jobs:
        job.obj.parent.mkdir(parents=True, exist_ok=True)
    ninja = find_ninja()
    if ninja is not None:
        write_ninja_file(build_dir / "build.ninja", commands, jobs)
        subprocess.run([ninja, "-C", str(build_dir)], check=True)
        return
    print("plait: ninja not found, compiling one file at a time")
    for job in jobs:
        command = [*commands[job.rule], "-c", str(job.source), "-o", str(job.obj)]
        print(shlex.join(command))
        subprocess.run(command, check=True)


class BuildExt(build_ext):
    """Builds plait._C: compiles with our own commands (C++ and nvcc), links with setuptools'."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        cuda = find_cuda()
        tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"
        build_dir = ROOT / "build" / f"plait_C.{tag}"
        includes = [str(ROOT / "csrc"), pybind11.get_include(), *self.include_dirs]
        defines = [f'PLAIT_VERSION="{self.distribution.get_version()}"']
        if cuda is not None:
            defines += ["PLAIT_WITH_CUDA=1", f'PLAIT_CUDA_VERSION="{cuda.version}"',
                        f'PLAIT_CUDA_ARCHS="{",".join(cuda.archs)}"']
            print(f"plait: building with CUDA {cuda.version} ({cuda.nvcc}) for {', '.join(cuda.archs)}")

        commands = {"cxx": [*self._cxx_compiler(), *CXX_FLAGS, *(f"-I{d}" for d in includes),
                            *(f"-D{d}" for d in defines)]}
        jobs = [Job("cxx", ROOT / s, build_dir / (s + ".o")) for s in ext.sources if s.endswith(".cpp")]
        if cuda is not None:
            commands["nvcc"] = [cuda.nvcc, *NVCC_FLAGS, *cuda.gencode_flags(), f"-I{ROOT / 'csrc'}",
                                "-DPLAIT_WITH_CUDA=1"]
            jobs += [Job("nvcc", ROOT / s, build_dir / (s + ".o")) for s in ext.sources if s.endswith(".cu")]
        compile_all(commands, jobs, build_dir)

        output = Path(self.get_ext_fullpath(ext.name))
        output.parent.mkdir(parents=True, exist_ok=True)
        # Keep the static CUDA runtime's symbols private to this module (Linux ld).
        link_args = ["-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else []
        self.compiler.link_shared_object(
            [str(j.obj) for j in jobs], str(output),
            libraries=CUDA_LIBS if cuda is not None else [],
            library_dirs=[str(cuda.lib_dir)] if cuda is not None else [],
            extra_postargs=link_args, target_lang="c++")

    def _cxx_compiler(self) -> list[str]:
        """The C++ compile command setuptools would use (Python's flags and -fPIC included)."""
        cc = self.compiler
        if getattr(cc, "compiler_so_cxx", None):
            return list(cc.compiler_so_cxx)
        return [cc.compiler_cxx[0], *cc.compiler_so[1:]]  # setuptools < 72: C command, C++ driver


setup(
    packages=all_packages(),
    package_dir=PACKAGE_DIR,
    ext_modules=[Extension("plait._C", sources=csrc_sources("*.cpp") + csrc_sources("*.cu"))],
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
