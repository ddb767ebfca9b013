"""The ``shm`` backend: collectives between CPU processes on one host through shared memory.

``Communicator.create("shm", group)`` is collective over ``group`` (a gloo or
NCCL ProcessGroup; None is WORLD): the ranks agree on a segment through
``torch.distributed`` once, then every operation runs in plait._C (csrc/shm/)
with the GIL released, and never touches ``torch.distributed`` again.

- Tensors must be on the CPU (CUDA: use "torch" or "ipc"). Reductions take
  float32, float16, bfloat16 (accumulated in fp32), float64, int32 and int64;
  all_gather, broadcast, send and recv take any dtype.
- all_reduce gives every rank bitwise the same result (fixed rank order).
- Every collective checks that all ranks made the same call (operation, dtype, reduce
  op, sizes, broadcast source); when they did not, every rank raises CommError naming
  the calls instead of mixing up data. Empty tensors take part in that check too.
- Collectives run when called; ``async_op=True`` returns a completed handle.
- all_reduce of a contiguous CPU tensor takes a fast path: one compiled call on the
  tensor's own memory, no allocation, no per-call Python closures (decode under tensor
  parallelism makes two of these per layer per token).
  send/recv run on per-peer background lanes, so an async send followed by a
  recv cannot deadlock (see :mod:`plait.comm.lanes`).
- Every wait is bounded by ``timeout_s``; a dead or missing peer turns into
  :class:`~plait.errors.CommTimeoutError` naming rank, group and operation on
  every surviving rank, after which the communicator is unusable.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..errors import CommError, CommTimeoutError
from .base import Communicator, DoneHandle
from .lanes import FutureHandle, Lanes
from .shm_config import ShmConfig
from .shm_setup import open_group, shm_extension
from .torch_backend import TorchCommunicator


class ShmCommunicator(Communicator):
    """Communicator over a POSIX shared-memory segment shared by the group's ranks.

    ``members`` (group ranks of ``group``, default all) makes it a communicator over those ranks
    only (ranks, size and names are theirs); every rank of ``group`` creates one at once with its
    own members, e.g. one per host for a group spanning hosts (:mod:`plait.comm.hier`).
    """

    backend = "shm"

    def __init__(self, group=None, *, name: Optional[str] = None, timeout_s: Optional[float] = None,
                 config: Optional[ShmConfig] = None, members: Optional[list[int]] = None) -> None:
        self._torch = TorchCommunicator(group, name=name, timeout_s=timeout_s)
        super().__init__(self._torch.name, timeout_s)
        self._members = list(range(self._torch.size)) if members is None else list(members)
        if self._torch.rank not in self._members:
            raise ValueError(f"members {self._members} of group {self.name!r} must include this rank "
                             f"(group rank {self._torch.rank})")
        self._rank = self._members.index(self._torch.rank)
        self._global_ranks = [self._torch.global_ranks[m] for m in self._members]
        self._C = shm_extension()
        self.config = config or ShmConfig.from_env(len(self._members))
        self._group = open_group(self._torch, self.config, self._members) if self._torch.size > 1 else None
        self._simd = self._group.simd if self._group is not None else "none (one rank)"
        self._lanes = Lanes(f"shm{self._torch.rank}")
        self._dtype_codes = {getattr(torch, n): code for n, code in self._C.shm_dtypes.items()}
        self._op_codes = dict(self._C.shm_ops)
        # (dtype, op) -> (dtype code, op code) for every combination the fast path may run
        self._reduce_codes = {(dtype, op): (code, self._op_codes[op]) for dtype, code in self._dtype_codes.items()
                              for op in self._op_codes if op != "avg" or dtype.is_floating_point}
        self._closed = False

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return len(self._members)

    @property
    def global_ranks(self) -> list[int]:
        return list(self._global_ranks)

    @property
    def simd(self) -> str:
        """The reduction code path this rank uses ("avx512", "avx2" or "scalar")."""
        return self._simd

    def reduces(self, dtype: torch.dtype) -> bool:
        """Whether all_reduce / reduce_scatter take ``dtype`` here (copies take any)."""
        return dtype in self._dtype_codes

    def close(self) -> None:
        """Finish queued transfers and unmap the segment; later calls raise CommError."""
        self._lanes.shutdown()
        self._closed = True
        self._group = None

    # ----------------------------------------------------------------- helpers
    def _check_cpu(self, tensor: torch.Tensor, op: str) -> None:
        if self._closed:
            raise CommError(f"{self.describe(op)}: this shm communicator was closed")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{op} takes a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type != "cpu":
            raise ValueError(f"{op}: the shm backend handles CPU tensors, got one on {tensor.device}; for CUDA "
                             f"tensors use Communicator.create('torch', group) (NCCL) or 'ipc' (CUDA IPC), "
                             f"or 'auto' to choose per device")

    def _reduce_code(self, tensor: torch.Tensor, op: str) -> int:
        code = self._dtype_codes.get(tensor.dtype)
        if code is None:
            names = ", ".join(str(d).replace("torch.", "") for d in self._dtype_codes)
            raise ValueError(f"{op}: the shm backend reduces {names}, not {tensor.dtype}; cast the tensor, or "
                             f"use Communicator.create('torch', group) for this dtype")
        return code

    def _run(self, op: str, tensor: Optional[torch.Tensor], call: Callable[[float], None]) -> None:
        """Run a compiled call with the current timeout, turning its errors into plait's.

        The label naming the operation is built only on error: it costs more than a small
        all_reduce itself.
        """
        limit = self.timeout_s
        try:
            call(limit)
        except self._C.ShmError as exc:
            raise self._comm_error(exc, op, tensor, limit) from None

    def _comm_error(self, exc: Exception, op: str, tensor: Optional[torch.Tensor], limit: float) -> CommError:
        """plait's error for a failed compiled call, naming rank, group and operation."""
        where = self.describe(self._label(op, tensor) if tensor is not None else op)
        if isinstance(exc, (self._C.ShmTimeout, self._C.ShmAborted)):
            return CommTimeoutError(f"{where} did not complete within {limit:g} s: {exc} "
                                    f"(set PLAIT_TIMEOUT_S to change the bound)")
        return CommError(f"{where} failed: {exc}")

    # -------------------------------------------------------------- collectives
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False):
        # Fast path: a contiguous CPU tensor of a dtype and op the compiled code reduces. Each
        # check below costs tens of nanoseconds; everything else falls through to
        # _all_reduce_checked, which explains what is wrong or copies a non-contiguous tensor.
        group = self._group
        if group is not None and isinstance(tensor, torch.Tensor) and tensor.is_cpu and tensor.is_contiguous():
            codes = self._reduce_codes.get((tensor.dtype, op))
            if codes is not None:
                limit = self.timeout_s
                try:
                    group.all_reduce(tensor.data_ptr(), tensor.numel(), codes[0], codes[1], limit)
                except self._C.ShmError as exc:
                    raise self._comm_error(exc, "all_reduce", tensor, limit) from None
                return DoneHandle(tensor) if async_op else tensor
        return self._all_reduce_checked(tensor, op, async_op)

    def _all_reduce_checked(self, tensor: torch.Tensor, op: str, async_op: bool):
        self._check_op(op)
        self._check_cpu(tensor, "all_reduce")
        dtype = self._reduce_code(tensor, "all_reduce")
        if op == "avg" and not tensor.is_floating_point():
            raise ValueError(f"all_reduce: op 'avg' needs a floating-point tensor, got {tensor.dtype}")
        if self.size > 1:
            self._in_place(tensor, lambda buf: self._run(
                "all_reduce", tensor,
                lambda t: self._group.all_reduce(buf.data_ptr(), buf.numel(), dtype, self._op_codes[op], t)))
        return DoneHandle(tensor) if async_op else tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0, async_op: bool = False):
        self._check_cpu(tensor, "all_gather")
        dim = self._tensor_dim(tensor, dim, "all_gather")
        if self.size == 1:
            return DoneHandle(tensor) if async_op else tensor
        src = tensor.contiguous()
        shape = list(src.shape)
        shape[dim] *= self.size
        out = torch.empty(shape, dtype=src.dtype)
        outer = math.prod(src.shape[:dim])  # empty tensors still take part: the ranks check they agree
        self._run("all_gather", tensor,
                  lambda t: self._group.all_gather(src.data_ptr(), out.data_ptr(),
                                                   src.numel() * src.element_size(), outer, t))
        return DoneHandle(out) if async_op else out

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0, op: str = "sum", async_op: bool = False):
        self._check_op(op)
        self._check_cpu(tensor, "reduce_scatter")
        dim = self._tensor_dim(tensor, dim, "reduce_scatter")
        self._check_divisible(tensor, dim, "reduce_scatter")
        dtype = self._reduce_code(tensor, "reduce_scatter")
        if op == "avg" and not tensor.is_floating_point():
            raise ValueError(f"reduce_scatter: op 'avg' needs a floating-point tensor, got {tensor.dtype}")
        if self.size == 1:
            return DoneHandle(tensor) if async_op else tensor
        src = tensor.contiguous()
        shape = list(src.shape)
        shape[dim] //= self.size
        out = torch.empty(shape, dtype=src.dtype)
        outer = math.prod(src.shape[:dim])
        self._run("reduce_scatter", tensor,
                  lambda t: self._group.reduce_scatter(src.data_ptr(), out.data_ptr(), out.numel(), outer,
                                                       dtype, self._op_codes[op], t))
        return DoneHandle(out) if async_op else out

    def reduce_scatter_in_place(self, flat: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce block ``rank`` of ``flat`` (a contiguous 1-D CPU tensor of ``size`` equal blocks) across the
        group, in place, and return it (a view); the other blocks keep their values. With
        :meth:`all_gather_in_place` this is a two-step all_reduce that copies nothing outside shared memory."""
        block = self._check_blocks(flat, "reduce_scatter_in_place")
        code = self._reduce_code(flat, "reduce_scatter_in_place")
        mine = flat[self.rank * block:(self.rank + 1) * block]
        if self.size > 1:
            self._run("reduce_scatter", flat, lambda t: self._group.reduce_scatter(
                flat.data_ptr(), mine.data_ptr(), block, 1, code, self._op_codes[op], t))
        return mine

    def all_gather_in_place(self, flat: torch.Tensor) -> torch.Tensor:
        """Fill every block of ``flat`` (as in :meth:`reduce_scatter_in_place`) from the rank that owns it."""
        block = self._check_blocks(flat, "all_gather_in_place")
        if self.size > 1:
            nbytes = block * flat.element_size()
            self._run("all_gather", flat, lambda t: self._group.all_gather(
                flat.data_ptr() + self.rank * nbytes, flat.data_ptr(), nbytes, 1, t))
        return flat

    def _check_blocks(self, flat: torch.Tensor, op: str) -> int:
        self._check_cpu(flat, op)
        if flat.dim() != 1 or not flat.is_contiguous() or flat.numel() % self.size:
            raise ValueError(f"{op} takes a contiguous 1-D tensor of {self.size} equal blocks, got shape "
                             f"{list(flat.shape)}")
        return flat.numel() // self.size

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False):
        self._check_peer(src, "src")
        self._check_cpu(tensor, "broadcast")
        if self.size > 1:
            self._in_place(tensor, lambda buf: self._run(
                "broadcast", tensor,
                lambda t: self._group.broadcast(buf.data_ptr(), buf.numel() * buf.element_size(), src, t)))
        return DoneHandle(tensor) if async_op else tensor

    def barrier(self) -> None:
        if self._closed:
            raise CommError(f"{self.describe('barrier')}: this shm communicator was closed")
        if self.size > 1:
            self._run("barrier", None, lambda t: self._group.barrier(t))

    # ---------------------------------------------------------- point to point
    def send(self, tensor: torch.Tensor, dst: int, async_op: bool = False):
        self._check_peer(dst, "dst")
        self._check_cpu(tensor, "send")
        self._check_not_self(dst, "send", "dst")
        src = tensor.contiguous()
        return self._transfer("send", dst, f"send(to group rank {dst})", tensor, lambda t: self._group.send(
            src.data_ptr(), src.numel() * src.element_size(), dst, t), None, async_op)

    def recv(self, tensor: torch.Tensor, src: int, async_op: bool = False):
        self._check_peer(src, "src")
        self._check_cpu(tensor, "recv")
        self._check_not_self(src, "recv", "src")
        if not tensor.is_contiguous():
            raise ValueError("recv needs a contiguous tensor to receive into")
        return self._transfer("recv", src, f"recv(from group rank {src})", tensor, lambda t: self._group.recv(
            tensor.data_ptr(), tensor.numel() * tensor.element_size(), src, t), tensor, async_op)

    def _transfer(self, kind: str, peer: int, op: str, tensor: torch.Tensor, call: Callable[[float], None],
                  result: Optional[torch.Tensor], async_op: bool):
        """Run a send/recv on its lane (inline when synchronous and nothing is queued there)."""
        lane = self._lanes.get(kind, peer)
        if not async_op and lane.idle():
            self._run(op, tensor, call)
            return result
        handle = FutureHandle(lane.submit(lambda: self._run(op, tensor, call)), result,
                              self.describe(self._label(op, tensor)), self.timeout_s)
        return handle if async_op else handle.wait()
