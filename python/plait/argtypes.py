"""Typed, range-checked values for command-line options (argparse ``type=`` functions).

Every numeric option of ``plait`` goes through one of these, so a zero, a negative, a
float where a whole number is meant, ``nan``/``inf`` or an absurd size is refused by the
parser with one line saying what is allowed (argparse prints it and exits with status 2):

    parser.add_argument("--gpus", type=positive_int(max_value=MAX_GPUS))
    parser.add_argument("--tp-overlap", type=fraction())
    parser.add_argument("--lr", type=positive_float())
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional


def _bounds(low: float, high: Optional[float], low_open: bool, high_open: bool) -> str:
    left = f"> {low:g}" if low_open else f">= {low:g}"
    if high is None:
        return left
    return f"{left} and {'<' if high_open else '<='} {high:g}"


def int_in(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """A parser of whole numbers in ``[low, high]`` (``high`` None: no upper bound)."""
    allowed = f"a whole number >= {low:,}" + ("" if high is None else f" and <= {high:,}")

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except (ValueError, AttributeError):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value:,} is out of range: expected {allowed}")
        return value

    parse.__name__ = f"int in [{low}, {high if high is not None else 'inf'}]"
    return parse


def float_in(low: float, high: Optional[float] = None, *, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """A parser of finite numbers between ``low`` and ``high`` (open ends where asked)."""
    allowed = f"a finite number {_bounds(low, high, low_open, high_open)}"

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except (ValueError, AttributeError):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        below = value <= low if low_open else value < low
        above = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"{text.strip()} is out of range: expected {allowed}")
        return value

    parse.__name__ = f"number {_bounds(low, high, low_open, high_open)}"
    return parse


def positive_int(max_value: Optional[int] = None) -> Callable[[str], int]:
    """Whole numbers >= 1 (and <= ``max_value``)."""
    return int_in(1, max_value)


def non_negative_int(max_value: Optional[int] = None) -> Callable[[str], int]:
    """Whole numbers >= 0 (and <= ``max_value``)."""
    return int_in(0, max_value)


def positive_float(max_value: Optional[float] = None) -> Callable[[str], float]:
    """Finite numbers > 0 (and <= ``max_value``)."""
    return float_in(0.0, max_value, low_open=True)


def non_negative_float(max_value: Optional[float] = None) -> Callable[[str], float]:
    """Finite numbers >= 0 (and <= ``max_value``)."""
    return float_in(0.0, max_value)


def fraction(*, allow_one: bool = True) -> Callable[[str], float]:
    """A fraction in [0, 1] (or [0, 1) with ``allow_one=False``)."""
    return float_in(0.0, 1.0, high_open=not allow_one)
