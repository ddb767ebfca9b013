"""The ``torch`` backend: plait's Communicator over ``torch.distributed`` (NCCL, gloo).

Every operation is issued with ``async_op=True`` and waited on with a bound, so
a missing peer becomes a :class:`~plait.errors.CommTimeoutError` naming rank,
group and operation instead of a hang.

CPU (gloo): ``Work.wait(timeout)`` blocks the host for at most the timeout.
CUDA (NCCL): ``Work.wait()`` only makes the *current stream* wait, which keeps
compute and communication overlapped; the bound is the process group's own
timeout, which :func:`plait.init_mesh` sets from ``PLAIT_TIMEOUT_S`` and which
NCCL's watchdog enforces.

Mismatched calls: when ranks call a collective with different sizes, gloo kills the
process (SIGABRT, "Received data size doesn't match expected size") and NCCL hangs or
mixes data. With ``PLAIT_CHECK_CALLS=1`` every collective (all_reduce, all_gather,
reduce_scatter, broadcast) is preceded by an all-gather of a fixed-size signature of the
call (operation, dtype, shape, reduce op, dim or source); when the ranks differ, every
rank raises :class:`~plait.errors.CommError` naming each rank's call instead. The check
costs one small collective per call (about 1 ms on gloo, see ``plait bench check_calls``),
so it is off by default (``PLAIT_CHECK_CALLS=0`` or unset; the defaults per engine are
:data:`plait.comm.agree.CHECK_CALLS_DEFAULT`). Every rank must use the same setting:
:func:`plait.init_mesh` checks that they do.
"""
from __future__ import annotations

import datetime
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..errors import CommError, CommTimeoutError, check_timeout
from .agree import call_signature, calls_disagree, check_calls_enabled
from .base import REDUCE_OPS, Communicator, DoneHandle, Handle

_TORCH_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

# torch 2.13 renamed the tensor-in/tensor-out collectives; older releases have only the old names.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


class TorchHandle(Handle):
    """A ``torch.distributed`` Work plus the step that turns its buffer into the result."""

    def __init__(self, work, finish: Callable[[], Optional[torch.Tensor]], comm: "TorchCommunicator",
                 op: str, on_cuda: bool) -> None:
        self._work = work
        self._finish = finish
        self._comm = comm
        self._op = op
        self._on_cuda = on_cuda
        self._done = False
        self._result: Optional[torch.Tensor] = None

    def wait(self, timeout_s: Optional[float] = None) -> Optional[torch.Tensor]:
        if self._done:
            return self._result
        limit = check_timeout(timeout_s) if timeout_s is not None else self._comm.timeout_s
        try:
            if self._on_cuda:
                self._work.wait()
            else:
                self._work.wait(timeout=datetime.timedelta(seconds=limit))
        except RuntimeError as exc:
            where = self._comm.describe(self._op)
            if _is_timeout(exc):
                raise CommTimeoutError(
                    f"{where} did not complete within {limit:g} s: a peer rank may have died "
                    f"or skipped this call (set PLAIT_TIMEOUT_S to change the bound)") from exc
            raise CommError(f"{where} failed: {exc}") from exc
        self._result = self._finish()
        self._done = True
        return self._result

    def is_completed(self) -> bool:
        return self._done or self._work.is_completed()


class TorchCommunicator(Communicator):
    """Communicator over a ``torch.distributed`` process group."""

    backend = "torch"

    def __init__(self, group=None, *, name: Optional[str] = None, timeout_s: Optional[float] = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call plait.init_mesh(...) "
                               "or torch.distributed.init_process_group(...) first")
        self.group = group if group is not None else dist.group.WORLD
        self._ranks = dist.get_process_group_ranks(self.group)
        self._rank = dist.get_rank(self.group)
        super().__init__(name or f"ranks{self._ranks}", timeout_s)
        self._native_reduce_scatter = True
        self.check_calls = check_calls_enabled(dist.get_backend(self.group))

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return len(self._ranks)

    @property
    def global_ranks(self) -> list[int]:
        return list(self._ranks)

    # ----------------------------------------------------------------- helpers
    def _issue(self, op: str, tensor: torch.Tensor, launch: Callable[[], object],
               finish: Callable[[], Optional[torch.Tensor]], async_op: bool):
        try:
            work = launch()
        except RuntimeError as exc:
            raise CommError(f"{self.describe(op)} could not start: {exc}") from exc
        handle = TorchHandle(work, finish, self, op, tensor.is_cuda)
        return handle if async_op else handle.wait()

    def _check_call(self, op: str, tensor: torch.Tensor, reduce_op: str | None = None, where: int = -1) -> None:
        """With ``check_calls``: all ranks compare their call first; CommError on every rank if they differ."""
        if not self.check_calls or self.size == 1:
            return
        mine = call_signature(op, tensor, REDUCE_OPS.index(reduce_op) if reduce_op else -1, where)
        rows = torch.empty(self.size * mine.numel(), dtype=mine.dtype, device=mine.device)
        self._issue(f"check of {self._label(op, tensor)}", mine,
                    lambda: _all_gather_tensor(rows, mine, group=self.group, async_op=True), lambda: None, False)
        detail = calls_disagree(rows.view(self.size, -1).tolist(), REDUCE_OPS)
        if detail is not None:
            raise CommError(f"{self.describe(self._label(op, tensor))}: the ranks called different collectives "
                            f"({detail}); every rank must make the same call (PLAIT_CHECK_CALLS=1 caught it "
                            f"before any data moved)")

    # -------------------------------------------------------------- collectives
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False):
        self._check_op(op)
        if self.size == 1:
            return DoneHandle(tensor) if async_op else tensor
        self._check_call("all_reduce", tensor, op)
        torch_op = _TORCH_OPS["sum" if op == "avg" else op]

        def finish() -> torch.Tensor:
            if op == "avg":
                tensor.div_(self.size)
            return tensor

        return self._issue(self._label("all_reduce", tensor), tensor,
                           lambda: dist.all_reduce(tensor, op=torch_op, group=self.group, async_op=True),
                           finish, async_op)

    def all_gather(self, tensor: torch.Tensor, dim: int = 0, async_op: bool = False):
        dim = self._tensor_dim(tensor, dim, "all_gather")
        if self.size == 1:
            return DoneHandle(tensor) if async_op else tensor
        self._check_call("all_gather", tensor, where=dim)
        src = tensor.contiguous()
        # Gathered along dim 0 (every backend's native layout), then moved if needed.
        out = torch.empty((self.size * src.shape[0], *src.shape[1:]), dtype=src.dtype, device=src.device)

        def finish() -> torch.Tensor:
            if dim == 0:
                return out
            return torch.cat(out.chunk(self.size, dim=0), dim=dim)

        return self._issue(self._label("all_gather", tensor), tensor,
                           lambda: _all_gather_tensor(out, src, group=self.group, async_op=True),
                           finish, async_op)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0, op: str = "sum", async_op: bool = False):
        self._check_op(op)
        dim = self._tensor_dim(tensor, dim, "reduce_scatter")
        self._check_divisible(tensor, dim, "reduce_scatter")
        if self.size == 1:
            return DoneHandle(tensor) if async_op else tensor
        self._check_call("reduce_scatter", tensor, op, dim)
        # Each rank's block must be contiguous and blocks concatenated along dim 0.
        blocks = tensor.contiguous() if dim == 0 else torch.cat(tensor.chunk(self.size, dim=dim), dim=0)
        block_shape = list(tensor.shape)
        block_shape[dim] //= self.size
        torch_op = _TORCH_OPS["sum" if op == "avg" else op]
        label = self._label("reduce_scatter", tensor)

        def scale(result: torch.Tensor) -> torch.Tensor:
            return result.div_(self.size) if op == "avg" else result

        if self._native_reduce_scatter:
            out = torch.empty(block_shape, dtype=tensor.dtype, device=tensor.device)
            try:
                return self._issue(label, tensor,
                                   lambda: _reduce_scatter_tensor(out, blocks, op=torch_op,
                                                                      group=self.group, async_op=True),
                                   lambda: scale(out), async_op)
            except CommError as exc:
                if "not supported" not in str(exc).lower():
                    raise
                self._native_reduce_scatter = False  # old gloo: fall back below, once and for all
        flat = blocks.reshape(self.size, -1).clone()  # all-reduce then keep this rank's block

        def finish_fallback() -> torch.Tensor:
            return scale(flat[self.rank].view(block_shape).clone())

        return self._issue(label, tensor,
                           lambda: dist.all_reduce(flat, op=torch_op, group=self.group, async_op=True),
                           finish_fallback, async_op)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False):
        self._check_peer(src, "src")
        if self.size == 1:
            return DoneHandle(tensor) if async_op else tensor
        self._check_call("broadcast", tensor, where=src)
        return self._issue(self._label("broadcast", tensor), tensor,
                           lambda: dist.broadcast(tensor, src=self._ranks[src], group=self.group, async_op=True),
                           lambda: tensor, async_op)

    def send(self, tensor: torch.Tensor, dst: int, async_op: bool = False):
        self._check_peer(dst, "dst")
        src = tensor.contiguous()
        return self._issue(self._label(f"send(to group rank {dst})", tensor), tensor,
                           lambda: dist.isend(src, dst=self._ranks[dst], group=self.group),
                           lambda: None, async_op)

    def recv(self, tensor: torch.Tensor, src: int, async_op: bool = False):
        self._check_peer(src, "src")
        if not tensor.is_contiguous():
            raise ValueError("recv needs a contiguous tensor to receive into")
        return self._issue(self._label(f"recv(from group rank {src})", tensor), tensor,
                           lambda: dist.irecv(tensor, src=self._ranks[src], group=self.group),
                           lambda: tensor, async_op)

    def barrier(self) -> None:
        if self.size == 1:
            return
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        token = torch.zeros(1, device=device)
        self._issue("barrier", token,
                    lambda: dist.all_reduce(token, group=self.group, async_op=True),
                    lambda: None, async_op=False)
