"""Typed, range-checked command-line options shared by ``plait generate`` and ``plait serve``.

Each check runs in the parser, so a bad value is one line from argparse (exit code 2)
before any process starts.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16", "float64")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


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
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32)")
    parser.add_argument("--max-len", type=positive_int, default=None,
                        help="positions per request in the KV cache (default: the model's context)")
