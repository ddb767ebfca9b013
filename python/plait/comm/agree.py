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
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ..errors import CommTimeoutError
from .base import Communicator

DIGEST_BYTES = 32


def _torch_comm(group: Any) -> Communicator:
    """A torch-backend communicator over the ranks of `group` (None: WORLD; a ProcessGroup;
    a Communicator, whose own process group is used so its backend need not carry bytes)."""
    if isinstance(group, Communicator):
        inner = getattr(group, "_torch", None)   # shm, ipc, auto keep a torch communicator
        if group.backend == "torch" or inner is None:
            return group
        return inner
    return Communicator.create("torch", group, name="world" if group is None else None)


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


def describe_disagreement(per_rank: list[dict[str, str]], what: str) -> str:
    """The message for ranks whose fields differ: each differing field with its value per rank."""
    names = sorted({name for fields in per_rank for name in fields})
    parts = []
    for name in names:
        values = [fields.get(name, "(not set)") for fields in per_rank]
        if len(set(values)) > 1:
            parts.append(f"{name}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values)))
    return (f"ranks disagree on {what}: " + "; ".join(parts) +
            "; start every rank with the same settings")


def check_agreement(fields: Mapping[str, Any], group: Any = None, *, what: str) -> None:
    """Raise ValueError on every rank of `group` unless all ranks pass equal `fields`.

    `fields` maps names to values compared by ``repr`` (ints, strings, dtypes, shapes,
    tuples ...). `group`: None (WORLD), a ProcessGroup or a Communicator. `what` names the
    thing being checked in the message. Collective: every rank of the group must call it,
    before any other collective that depends on the fields. Costs one all-gather of 32
    bytes per rank when the ranks agree.
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
    raise ValueError(describe_disagreement(per_rank, what) + f" (group {comm.name!r})")
