"""Errors plait raises, and the one place that reads the global timeout.

Every wait in plait is bounded. When a bound runs out we raise
:class:`CommTimeoutError` whose message names the rank, the group and the
operation, so a hung job turns into a readable error on every surviving rank.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

DEFAULT_TIMEOUT_S = 300.0


def check_timeout(value: object, what: str = "timeout_s") -> float:
    """`value` as a timeout in seconds: a finite number > 0, else ValueError (0, negatives, nan and
    inf are refused, never read as "no timeout" or "now")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what}={value!r} must be a finite number of seconds > 0")
    return float(value)


def default_timeout_s() -> float:
    """Timeout for collectives in seconds: ``PLAIT_TIMEOUT_S`` or 300.

    Read on every call so tests and users can change it between operations. Small
    collectives call this once each, so it must cost far less than they do: the parse of
    each value seen is remembered, and on POSIX the variable is looked up in the dict behind
    ``os.environ`` (which every change through ``os.environ`` updates), because
    ``os.environ.get`` of an unset variable raises and catches a KeyError inside, which
    costs microseconds.
    """
    raw = _ENVIRON_BYTES.get(_TIMEOUT_KEY) if _ENVIRON_BYTES is not None else os.environ.get("PLAIT_TIMEOUT_S")
    return _parse_timeout(raw)


_TIMEOUT_KEY = b"PLAIT_TIMEOUT_S"
_ENVIRON_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_ENVIRON_BYTES, dict):
    _ENVIRON_BYTES = None


@functools.lru_cache(maxsize=16)
def _parse_timeout(raw: Optional[str | bytes]) -> float:
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
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


class HostLost(CommError):
    """A host of a multi-host job vanished (its link cut, its processes killed); the message names it.

    Raised in place of the collective's own error (a timeout, gloo's "connection closed") once
    :mod:`plait.hostwatch` has seen that host's ranks stop.
    """
