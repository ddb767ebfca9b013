"""``Communicator.create("hier", group)``: CPU collectives for a group that spans hosts.

Shared memory inside each host, gloo between hosts, so only one share of each message per
rank crosses the network (the ``auto`` communicator picks this for CPU tensors of such groups):

==============  ========================================================================
operation       steps (L ranks on each of H hosts; local rank i of every host forms
                cross-host group i)
==============  ========================================================================
all_reduce      shm reduce-scatter inside each host (block i: 1/L of the message, in place;
                padded in a kept buffer when L does not divide it), gloo all-reduce of
                block i in cross group i, shm all-gather inside each host (in place);
                pipelined over pieces of PIECE_BYTES
all_gather      gloo all-gather of each rank's tensor in its cross group, then shm
                all-gather inside each host (then reordered into group rank order)
broadcast       gloo broadcast in the source's cross group from the source's host, then
                shm broadcast inside each host from the source's local rank
reduce_scatter, the group's own torch process group (gloo), unchanged
send, recv,
barrier
==============  ========================================================================

Sums: every rank gets bitwise the same result, in a fixed order: the shm step adds a host's
ranks in local rank order (fp16/bf16 accumulated in fp32, rounded once), then gloo adds the
H host sums. Flat gloo adds the ranks along its ring, starting at a different rank for each
chunk, so the two agree bitwise only where the order cannot matter: integer dtypes, and
floats whose partial sums are exact (tests/test_comm_hier.py checks both). Otherwise neither
is "the" sum; each is within the bound of any order of summing n terms, |result - exact| <=
(n - 1) * u * sum(|x|) per element (u = eps/2 of the dtype, n the group size), and the tests
check hier and flat gloo against a float64 sum with that bound (with random fp32 data the two
differ in the last bits at most sizes). ``avg`` is the sum divided by
the group size at the end. Collectives run when called; ``async_op=True`` returns a
completed handle.

Ranks per host must be the same on every host (``HostLayout.even``); otherwise creation
raises :class:`~plait.errors.CommError` and ``auto`` uses flat gloo for the group, saying so.

Set-up is collective over the group: host keys (unless given), one shm segment per host
(:func:`plait.comm.shm_setup.open_group` with ``members``) and one gloo process group per
cross group, made on the job's rendezvous store under a prefix agreed at creation (torch's
``new_group`` would need every rank of the job, not just this group's, to take part).
Every step is bounded by the timeout and its errors name rank, group, operation and hosts.
"""
from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from ..errors import CommError
from .base import Communicator, DoneHandle, RanksOfTorch
from .rendezvous import all_gather_text, hosts_of_group
from .shm_backend import ShmCommunicator
from .torch_backend import _TORCH_OPS, TorchCommunicator, TorchHandle

T = TypeVar("T")
# all_reduce works in pieces of this many bytes, so that gloo between hosts overlaps the shm steps
# (one profile, 2 test hosts x 2 ranks on 2 busy cores, float32 64 MB: 232 ms in 4 MiB pieces, 354 ms in one)
PIECE_BYTES = 4 << 20


@dataclass(frozen=True)
class HostLayout:
    """Which group ranks share a host: ``hosts[h]`` lists host h's group ranks in order (hosts in
    order of their first rank); ``names[h]`` is its hostname."""

    hosts: tuple[tuple[int, ...], ...]
    names: tuple[str, ...]

    @classmethod
    def from_keys(cls, keys: list[str]) -> "HostLayout":
        """From each group rank's :func:`plait.comm.rendezvous.host_key`."""
        order: dict[str, list[int]] = {}
        for rank, key in enumerate(keys):
            order.setdefault(key, []).append(rank)
        return cls(tuple(tuple(r) for r in order.values()), tuple(k.split("|")[0] for k in order))

    @property
    def even(self) -> bool:
        """Whether every host holds the same number of the group's ranks."""
        return len({len(ranks) for ranks in self.hosts}) == 1

    def where(self, rank: int) -> tuple[int, int]:
        """(host index, local index) of a group rank."""
        for h, ranks in enumerate(self.hosts):
            if rank in ranks:
                return h, ranks.index(rank)
        raise ValueError(f"group rank {rank} is on no host of {self.hosts}")

    def cross(self, local: int) -> list[int]:
        """Group ranks of cross group ``local``: local rank ``local`` of each host, in host order."""
        return [ranks[local] for ranks in self.hosts]

    def describe(self) -> str:
        return ", ".join(f"{name}: ranks {list(ranks)}" for name, ranks in zip(self.names, self.hosts))


def _default_store():
    """The job's rendezvous store (torch keeps it private; every torch.distributed job has one)."""
    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    if getter is None:
        raise CommError("this torch has no torch.distributed.distributed_c10d._get_default_store, which the "
                        "hierarchical communicator needs to make its cross-host gloo groups")
    return getter()


class CrossHost:
    """A gloo process group over one cross group (local rank i of every host), outside torch's group
    registry, with plait's timeouts and error messages."""

    def __init__(self, parent: "HierCommunicator", members: list[int], prefix: str) -> None:
        self.rank = members.index(parent.rank)
        self.size = len(members)
        self.global_ranks = [parent.global_ranks[m] for m in members]
        self.hosts = [parent.layout.names[parent.layout.where(m)[0]] for m in members]
        self.name = f"{parent.name}:cross{parent.layout.where(parent.rank)[1]}"
        self._parent = parent
        timeout = datetime.timedelta(seconds=parent.timeout_s)
        try:
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore(prefix, _default_store()), self.rank, self.size,
                                            timeout)
        except RuntimeError as exc:
            raise CommError(f"{self.describe('set-up')} could not connect: {exc}") from exc

    @property
    def timeout_s(self) -> float:
        return self._parent.timeout_s

    def describe(self, op: str) -> str:
        return (f"rank {self.rank} of cross-host group {self.name!r} (global ranks {self.global_ranks} on hosts "
                f"{', '.join(self.hosts)}), operation {op}")

    def start(self, op: str, launch: Callable[[], object]) -> TorchHandle:
        """Issue ``launch()`` (a gloo call on ``self.pg``); its handle's ``wait`` is bounded and names the op."""
        if self.pg is None:
            raise CommError(f"{self.describe(op)}: this communicator was closed")
        try:
            work = launch()
        except RuntimeError as exc:
            raise CommError(f"{self.describe(op)} could not start: {exc}") from exc
        return TorchHandle(work, lambda: None, self, op, False)

    def run(self, op: str, launch: Callable[[], object]) -> None:
        self.start(op, launch).wait()


class HierCommunicator(RanksOfTorch, Communicator):
    """Hierarchical CPU collectives for a group spanning hosts (module docstring)."""

    backend = "hier"

    def __init__(self, group=None, *, name: Optional[str] = None, timeout_s: Optional[float] = None,
                 host_keys: Optional[list[str]] = None) -> None:
        self.host_name = ""  # this rank's hostname, once known
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        self._torch = TorchCommunicator(group, name=name, timeout_s=timeout_s)
        super().__init__(self._torch.name, timeout_s)
        engines = str(dist.get_backend(self._torch.group)).lower()
        if "gloo" not in engines:
            raise CommError(f"{self.describe('set-up')}: hierarchical collectives need gloo between hosts, but "
                            f"the group's engine is {engines!r}")
        keys = host_keys if host_keys is not None else hosts_of_group(self._torch)
        self.layout = HostLayout.from_keys(keys)
        if not self.layout.even:
            raise CommError(f"{self.describe('set-up')}: hierarchical collectives need the same number of ranks "
                            f"on every host, but the group has {self.layout.describe()}")
        self.host, self.local_rank = self.layout.where(self.rank)
        self.host_name = self.layout.names[self.host]
        self.local = ShmCommunicator(group, name=f"{self.name}@{self.host_name}", timeout_s=timeout_s,
                                     members=list(self.layout.hosts[self.host]))
        token = all_gather_text(self._torch, secrets.token_hex(8))[0]  # agreed, fresh per communicator
        error = ""
        try:
            self.cross = CrossHost(self, self.layout.cross(self.local_rank), f"plait/hier/{token}/{self.local_rank}/")
        except CommError as exc:
            error = str(exc)
        failed = {r: text for r, text in enumerate(all_gather_text(self._torch, error)) if text}
        if failed:  # raised on every rank alike, so that all fall back together
            self.local.close()
            raise CommError(f"{self.describe('set-up')}: the cross-host groups failed on "
                            + "; ".join(f"group rank {r}: {text}" for r, text in failed.items()))

    def describe(self, op: str) -> str:
        where = f" on host {self.host_name}" if self.host_name else ""
        return f"{super().describe(op)}{where}"

    def _step(self, label: str, step: str, run: Callable[[], T]) -> T:
        """``run()``, its CommError re-raised (same class) naming this operation, host and step first."""
        try:
            return run()
        except CommError as exc:
            raise type(exc)(f"{self.describe(label)}, {step}: {exc}") from exc

    def reduces(self, dtype: torch.dtype) -> bool:
        """Whether all_reduce takes ``dtype`` here (the shm step's dtypes)."""
        return self.local.reduces(dtype)

    def close(self) -> None:
        """Unmap the host's segment and drop the cross-host group; later calls raise CommError."""
        self.local.close()
        self.cross.pg = None
        self._buffers.clear()

    # -------------------------------------------------------------- collectives
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False):
        self._check_op(op)
        self.local._check_cpu(tensor, "all_reduce")
        self.local._reduce_code(tensor, "all_reduce")
        if op == "avg" and not tensor.is_floating_point():
            raise ValueError(f"all_reduce: op 'avg' needs a floating-point tensor, got {tensor.dtype}")
        label = self._label("all_reduce", tensor)
        self._in_place(tensor, lambda buf: self._all_reduce_flat(buf.view(-1), "sum" if op == "avg" else op, label))
        if op == "avg":
            tensor.div_(self.size)
        return DoneHandle(tensor) if async_op else tensor

    def _all_reduce_flat(self, flat: torch.Tensor, op: str, label: str) -> None:
        """Pipelined over pieces of about PIECE_BYTES: each piece's gloo all-reduce runs (on gloo's threads)
        while the next piece is reduce-scattered and earlier pieces are all-gathered."""
        n, parts = flat.numel(), self.local.size
        if n == 0:
            return
        block = -(-n // parts)
        work = flat
        if block * parts != n:  # L equal blocks: pad into a kept buffer; the padding is reduced, then dropped
            work = self._workspace(block * parts, flat.dtype)
            work[:n].copy_(flat)
            work[n:].zero_()
        step = max(parts, PIECE_BYTES // work.element_size() // parts * parts)
        pieces = list(work.split(step))
        pending = []
        for index, piece in enumerate(pieces):
            mine = self._step(label, "shm reduce-scatter inside the host",
                              lambda: self.local.reduce_scatter_in_place(piece, op)) if parts > 1 else piece
            pending.append(self._step(
                label, f"gloo all-reduce of block {self.local_rank} between hosts",
                lambda: self.cross.start(f"all_reduce({mine.numel()} values, piece {index} of {len(pieces)})",
                                         lambda: self.cross.pg.allreduce([mine], _opts(op)))))
        for piece, handle in zip(pieces, pending):
            self._step(label, f"gloo all-reduce of block {self.local_rank} between hosts", handle.wait)
            if parts > 1:
                self._step(label, "shm all-gather inside the host", lambda: self.local.all_gather_in_place(piece))
        if work is not flat:
            flat.copy_(work[:n])

    def _workspace(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A kept 1-D buffer of at least ``numel`` values of ``dtype`` (allocating per call costs page faults)."""
        kept = self._buffers.get(dtype)
        if kept is None or kept.numel() < numel:
            kept = self._buffers[dtype] = torch.empty(numel, dtype=dtype)
        return kept[:numel]

    def all_gather(self, tensor: torch.Tensor, dim: int = 0, async_op: bool = False):
        self.local._check_cpu(tensor, "all_gather")
        dim = self._tensor_dim(tensor, dim, "all_gather")
        src = tensor.contiguous()
        hosts, parts = len(self.layout.hosts), self.local.size
        label = self._label("all_gather", tensor)
        rows = torch.empty((hosts, *src.shape), dtype=src.dtype)
        if src.numel():
            outs = list(rows.unbind(0))
            self._step(label, "gloo all-gather between hosts",
                       lambda: self.cross.run("all_gather", lambda: self.cross.pg.allgather([outs], [src])))
        # every local rank now holds its cross group's tensors, host by host: gather those inside the host
        table = self._step(label, "shm all-gather inside the host",
                           lambda: self.local.all_gather(rows.view(1, -1))) if parts > 1 else rows.view(1, -1)
        blocks = table.view(parts, hosts, *src.shape).transpose(0, 1)  # [host][local] ...
        order = [self.layout.where(r) for r in range(self.size)]
        out = torch.cat([blocks[h, i] for h, i in order], dim=0)
        if dim != 0:
            out = torch.cat(out.chunk(self.size, dim=0), dim=dim)
        return DoneHandle(out) if async_op else out

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False):
        self._check_peer(src, "src")
        self.local._check_cpu(tensor, "broadcast")
        src_host, src_local = self.layout.where(src)
        label = self._label("broadcast", tensor)

        def run(buf: torch.Tensor) -> None:
            if self.local_rank == src_local and buf.numel():
                self._step(label, f"gloo broadcast between hosts from host {self.layout.names[src_host]}",
                           lambda: self.cross.run("broadcast",
                                                  lambda: self.cross.pg.broadcast([buf], _bcast_opts(src_host))))
            self._step(label, "shm broadcast inside the host", lambda: self.local.broadcast(buf, src=src_local))

        self._in_place(tensor, run)
        return DoneHandle(tensor) if async_op else tensor

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0, op: str = "sum", async_op: bool = False):
        return self._torch.reduce_scatter(tensor, dim=dim, op=op, async_op=async_op)

    def send(self, tensor: torch.Tensor, dst: int, async_op: bool = False):
        return self._torch.send(tensor, dst=dst, async_op=async_op)

    def recv(self, tensor: torch.Tensor, src: int, async_op: bool = False):
        return self._torch.recv(tensor, src=src, async_op=async_op)

    def barrier(self) -> None:
        self._torch.barrier()


def _opts(op: str) -> "dist.AllreduceOptions":
    opts = dist.AllreduceOptions()
    opts.reduceOp = _TORCH_OPS[op]
    return opts


def _bcast_opts(root: int) -> "dist.BroadcastOptions":
    opts = dist.BroadcastOptions()
    opts.rootRank = root
    opts.rootTensor = 0
    return opts
