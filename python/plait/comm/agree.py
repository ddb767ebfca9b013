"""Do all ranks agree? One small exchange that turns a mismatch into the same ValueError everywhere.

Ranks started with different settings (a different ``--hidden`` on one of them, another
dtype, another plait version) would otherwise meet in a collective of mismatched sizes,
where gloo kills the process (SIGABRT) and NCCL hangs or mixes data. So a job, a layer or
an engine first calls::

    check_agreement({"hidden": 1024, "dtype": torch.bfloat16}, group, what="ColumnParallelLinear")

Each rank hashes its fields (each value by ``repr``) into a 32-byte digest and the ranks
all-gather the digests: one fixed-size collective whatever the values, so it cannot
itself mismatch. When the digests differ, every rank sees it, and the ranks exchange the
values themselves (lengths first, then the padded text) to raise, on every rank alike::

    ValueError: ranks disagree on ColumnParallelLinear: hidden: rank 0: 1024, rank 1: 2048; ...

All exchanges go through a :class:`~plait.comm.Communicator`, so they are bounded by
``PLAIT_TIMEOUT_S`` like every other wait in plait.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Collection, Mapping
from typing import Any

import torch
import torch.distributed as dist

from ..errors import CommTimeoutError
from .base import Communicator


def _torch_comm(group: Any) -> Communicator:
    """A torch-backend communicator over the ranks of `group` (None: WORLD; a ProcessGroup; a
    Communicator, whose process group is used), without per-call checks: the exchanges here are
    fixed-size by construction, and must not depend on a setting the ranks may disagree on."""
    from .torch_backend import TorchCommunicator

    if isinstance(group, Communicator):
        inner = group if isinstance(group, TorchCommunicator) else getattr(group, "_torch", None)
        if inner is None:           # a backend without a process group: use it as it is
            return group
        comm = TorchCommunicator(inner.group, name=inner.name, timeout_s=inner._timeout_s)
    else:
        comm = TorchCommunicator(group, name="world" if group is None else None)
    comm.check_calls = False
    return comm


def _device(comm: Communicator) -> torch.device:
    group = getattr(comm, "group", None)
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _texts(fields: Mapping[str, Any]) -> dict[str, str]:
    return {str(name): repr(value) for name, value in fields.items()}


def _gather_bytes(comm: Communicator, payload: bytes, device: torch.device) -> list[bytes]:
    """Every rank's `payload`, in rank order: lengths first, so the padded exchange is the same size."""
    length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    lengths = [int(n) for n in comm.all_gather(length, dim=0).tolist()]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    if payload:
        padded[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    rows = comm.all_gather(padded.unsqueeze(0), dim=0).cpu()
    return [bytes(rows[r, :n].tolist()) for r, n in enumerate(lengths)]


def disagreements(per_rank: list[dict[str, str]], optional: Collection[str] = ()) -> list[str]:
    """Each field whose values differ between ranks, as ``"name: rank 0: v0, rank 1: v1"``.

    A field named in `optional` is compared only among the ranks where it is not None.
    """
    names = sorted({name for fields in per_rank for name in fields})
    parts = []
    for name in names:
        values = [fields.get(name, "(not set)") for fields in per_rank]
        compared = {v for v in values if not (name in optional and v == repr(None))}
        if len(compared) > 1:
            parts.append(f"{name}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values)))
    return parts


def check_agreement(fields: Mapping[str, Any], group: Any = None, *, what: str,
                    optional: Collection[str] = ()) -> None:
    """Raise ValueError on every rank of `group` unless all ranks pass equal `fields`.

    `fields` maps names to values compared by ``repr`` (ints, strings, dtypes, shapes,
    tuples ...); a field named in `optional` may be None on ranks that have no value for it.
    `group`: None (WORLD), a ProcessGroup or a Communicator. `what` names the thing being
    checked in the message. Collective: every rank of the group must call it, before any
    other collective that depends on the fields. Costs one all-gather of 32 bytes per rank
    when the ranks agree.
    """
    comm = _torch_comm(group)
    if comm.size == 1:
        return
    device = _device(comm)
    texts = _texts(fields)
    encoded = json.dumps(texts, sort_keys=True).encode()
    digest = torch.frombuffer(bytearray(hashlib.sha256(encoded).digest()), dtype=torch.uint8).to(device)
    try:
        digests = comm.all_gather(digest.unsqueeze(0), dim=0)
    except CommTimeoutError as exc:
        raise CommTimeoutError(f"checking that the ranks agree on {what}: {exc}; a rank that did not come may "
                               f"have rejected its own, different, arguments (see its error)") from exc
    if bool((digests == digests[0]).all()):
        return
    per_rank = [json.loads(blob) for blob in _gather_bytes(comm, encoded, device)]
    parts = disagreements(per_rank, optional)
    if parts:   # every rank gathered the same values, so every rank decides alike
        raise ValueError(f"ranks disagree on {what}: " + "; ".join(parts) +
                         f"; start every rank with the same settings (group {comm.name!r})")


# ---------------------------------------------------------------- per-call agreement (PLAIT_CHECK_CALLS)
CHECK_CALLS_ENV = "PLAIT_CHECK_CALLS"
# Whether a torch-backend communicator checks every collective when PLAIT_CHECK_CALLS is unset, per engine.
# The decision must be the same on every rank for every call (a check is itself a collective), so it is
# per engine, not per tensor size. bench/check_calls.py measured the check on gloo (2 ranks) at about
# 1 ms a call: over 5% of every call up to 16 MB, so it is off by default; NCCL is not measured yet.
CHECK_CALLS_DEFAULT = {"gloo": False, "nccl": False}
CALL_OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
_DIMS = 11
_HEAD = 5   # operation, dtype, reduce op, dim or source rank, number of dims


def check_calls_enabled(engine: str) -> bool:
    """Whether collectives on a torch.distributed `engine` ("gloo", "nccl") check that ranks agree:
    ``PLAIT_CHECK_CALLS=1`` on, ``0`` off, unset or ``auto``: :data:`CHECK_CALLS_DEFAULT`."""
    raw = os.environ.get(CHECK_CALLS_ENV, "").strip().lower()
    if raw in ("", "auto"):
        return CHECK_CALLS_DEFAULT.get(str(engine).lower(), False)
    if raw not in ("0", "1"):
        raise ValueError(f"{CHECK_CALLS_ENV}={raw!r}: use 1 (check every collective), 0 (never) or auto")
    return raw == "1"


def call_signature(op: str, tensor: torch.Tensor, reduce_op: int = -1, where: int = -1) -> torch.Tensor:
    """A fixed-size int64 description of one collective call: the operation, dtype, reduce op
    (index in REDUCE_OPS, -1: none), dim or source rank (-1: none), the shape (dims past 11
    folded into the last) and the element count."""
    shape = list(tensor.shape)
    if len(shape) > _DIMS:
        shape = shape[:_DIMS - 1] + [math.prod(shape[_DIMS - 1:])]
    dtype = _DTYPES.index(tensor.dtype) if tensor.dtype in _DTYPES else len(_DTYPES)
    values = [CALL_OPS.index(op), dtype, reduce_op, where, len(shape), *shape, *[-1] * (_DIMS - len(shape)),
              tensor.numel()]
    return torch.tensor(values, dtype=torch.int64, device=tensor.device)


def describe_call(row: list[int], reduce_ops: tuple[str, ...]) -> str:
    """Text of a signature made by :func:`call_signature`, e.g. ``all_reduce(float32[3, 8], op=sum)``."""
    op, dtype, reduce_op, where, ndim = row[:_HEAD]
    dtype_name = str(_DTYPES[dtype]).replace("torch.", "") if dtype < len(_DTYPES) else "other dtype"
    name = CALL_OPS[op] if 0 <= op < len(CALL_OPS) else f"operation {op}"
    extras = ([f"op={reduce_ops[reduce_op]}"] if 0 <= reduce_op < len(reduce_ops) else [])
    extras += [f"{'src' if name == 'broadcast' else 'dim'}={where}"] if where >= 0 else []
    return f"{name}({dtype_name}{row[_HEAD:_HEAD + ndim]}{''.join(', ' + e for e in extras)})"


def calls_disagree(rows: list[list[int]], reduce_ops: tuple[str, ...]) -> str | None:
    """None when every rank's signature is the same, else the calls per rank."""
    if all(row == rows[0] for row in rows):
        return None
    return ", ".join(f"rank {r}: {describe_call(row, reduce_ops)}" for r, row in enumerate(rows))
