"""Errors plait raises, and the one place that reads the global timeout.

Every wait in plait is bounded. When a bound runs out we raise
:class:`CommTimeoutError` whose message names the rank, the group and the
operation, so a hung job turns into a readable error on every surviving rank.
"""
from __future__ import annotations

import math
import os

DEFAULT_TIMEOUT_S = 300.0


def check_timeout(value: object, what: str = "timeout_s") -> float:
    """`value` as a timeout in seconds: a finite number > 0, else ValueError (0, negatives, nan and
    inf are refused, never read as "no timeout" or "now")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what}={value!r} must be a finite number of seconds > 0")
    return float(value)


def default_timeout_s() -> float:
    """Timeout for collectives in seconds: ``PLAIT_TIMEOUT_S`` or 300.

    Read on every call so tests and users can change it between operations.
    """
    raw = os.environ.get("PLAIT_TIMEOUT_S")
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"PLAIT_TIMEOUT_S={raw!r} is not a number of seconds") from exc
    return check_timeout(value, f"PLAIT_TIMEOUT_S={raw!r}: the timeout")


class PlaitError(RuntimeError):
    """Base class of plait's runtime errors."""


class CommError(PlaitError):
    """A collective or point-to-point operation failed."""


class CommTimeoutError(CommError, TimeoutError):
    """A collective or point-to-point operation did not finish within its timeout.

    After this error the communicator that raised it is unusable: the peers
    are in an unknown state, exactly as after an NCCL abort.
    """
