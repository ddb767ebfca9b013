"""Small agreements among a group's ranks at communicator creation, over ``torch.distributed``.

The shm and ipc backends need every rank to learn a segment name or handle from
one rank, to report setup failures to every rank, and to know whether all ranks
share a host. These helpers do that with a :class:`TorchCommunicator` (so every
wait is bounded and named), exchanging short texts as fixed-width byte tensors.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from .torch_backend import TorchCommunicator

TEXT_BYTES = 1024


def exchange_device(comm: TorchCommunicator) -> torch.device:
    """Where the group's collectives take tensors: CPU when it has gloo, else CUDA (NCCL only)."""
    backend = str(dist.get_backend(comm.group)).lower()
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_gather_text(comm: TorchCommunicator, text: str, width: int = TEXT_BYTES) -> list[str]:
    """Every rank's ``text`` (UTF-8, cut to ``width`` bytes), in group rank order."""
    raw = text.encode()[:width]
    buf = torch.zeros(1, width + 2, dtype=torch.uint8)
    buf[0, 0], buf[0, 1] = len(raw) >> 8, len(raw) & 0xFF
    buf[0, 2:2 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else buf[0, 2:2]
    rows = comm.all_gather(buf.to(exchange_device(comm)), dim=0).cpu()
    out = []
    for row in rows:
        n = (int(row[0]) << 8) | int(row[1])
        out.append(bytes(row[2:2 + n].tolist()).decode(errors="replace"))
    return out


def host_key() -> str:
    """Identifies the memory domain this process can share through /dev/shm.

    Two processes match when they run on the same boot of the same machine and see the
    same /dev/shm (containers with private /dev/shm differ). The hostname comes first
    so error messages can show it.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    try:
        info = os.stat("/dev/shm")
        shm = f"{info.st_dev}:{info.st_ino}"
    except OSError:
        shm = "no-dev-shm"
    return f"{socket.gethostname()}|{boot}|{shm}"


def hosts_of_group(comm: TorchCommunicator) -> list[str]:
    """Each group rank's :func:`host_key`, in group rank order."""
    return all_gather_text(comm, host_key())


def describe_hosts(keys: list[str]) -> str:
    """'host a: ranks [0, 1]; host b: ranks [2, 3]' from per-rank host keys."""
    ranks_by_host: dict[str, list[int]] = {}
    for rank, key in enumerate(keys):
        ranks_by_host.setdefault(key, []).append(rank)
    return "; ".join(f"host {key.split('|')[0]}: ranks {ranks}" for key, ranks in ranks_by_host.items())
