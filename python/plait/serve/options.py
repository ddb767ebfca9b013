"""Typed, range-checked command-line options shared by ``plait generate`` and ``plait serve``.

Each check runs in the parser, so a bad value is one line from argparse (exit code 2)
before any process starts.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
CPU_BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}     # /proc/cpuinfo and torch names
BLOCK_SIZE = 16           # positions per KV-cache block (plait.serve.kv_cache)
MAX_STEP_TOKENS = 512     # new tokens per engine step (plait.serve.scheduler)


def checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert`` the text, then refuse it unless ``ok``; ``what`` says what is allowed."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


positive_int = checked(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = checked(int, lambda v: v >= 0, "an integer >= 0")
nonnegative_float = checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
probability = checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
port = checked(int, lambda v: 1 <= v <= 65535, "a port in [1, 65535]")
seconds = checked(float, lambda v: 0 < v < 1e7, "seconds in (0, 1e7)")
gib = checked(float, lambda v: math.isfinite(v) and v > 0, "a positive number of GiB")


def model_dir(text: str) -> str:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a directory (a local transformers model directory)")
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text}: no config.json; is this a transformers model directory?")
    return str(path)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --tp, --pp, --dtype, --max-len."""
    parser.add_argument("--model", required=True, type=model_dir, help="transformers model directory")
    parser.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel ranks (default 1)")
    parser.add_argument("--pp", type=positive_int, default=1, help="pipeline stages (default 1)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="compute dtype (default auto: bfloat16 on a GPU or on a CPU with AMX-BF16 or "
                             "AVX512-BF16, else float32)")
    parser.add_argument("--max-len", type=positive_int, default=None,
                        help="positions per request in the KV cache (default: the model's context)")


def cpu_bf16_feature() -> str | None:
    """The bfloat16 instructions of this CPU that torch uses (AMX-BF16, else AVX512-BF16), or None: from
    ``torch.cpu.get_capabilities()`` where torch has it, else the flags of /proc/cpuinfo."""
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        flags = {name for name, value in capabilities().items() if value is True}
    else:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
        flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                          if line.startswith("flags")), []))
    return next((label for flag, label in CPU_BF16_FLAGS.items() if flag in flags), None)


def resolve_dtype(name: str) -> tuple[str, str]:
    """``(dtype, why)`` for ``--dtype name``: ``auto`` is bfloat16 on a CUDA GPU or on a CPU with bfloat16
    instructions (:func:`cpu_bf16_feature`), float32 on any other CPU; any other name is itself."""
    if name != "auto":
        return name, "as asked"
    import torch

    if torch.cuda.is_available():
        return "bfloat16", f"auto: CUDA GPU {torch.cuda.get_device_name(0)}"
    feature = cpu_bf16_feature()
    if feature is not None:
        return "bfloat16", f"auto: the CPU has {feature}"
    return "float32", "auto: the CPU has neither AMX-BF16 nor AVX512-BF16"
