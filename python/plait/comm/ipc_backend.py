"""The ``ipc`` backend: collectives between the GPU processes of one node over CUDA IPC.

``Communicator.create("ipc", group)`` is collective: every rank allocates one device
buffer (signal flags, a data area, one inbox per source rank), the ranks swap their
``cudaIpcMemHandle`` through ``torch.distributed`` and map each other's buffers, and
from then on every operation is a few copies and kernels on the current CUDA stream
(csrc/cuda/ipc*.cu), as NCCL's are. Ranks may share one GPU (CUDA IPC works between
processes on one device, where NCCL refuses) or sit on GPUs with P2P access.

- all_reduce: one-shot up to ``PLAIT_IPC_ONESHOT_BYTES`` (256 KiB), else two-shot;
  fp32 accumulation in rank order, so every rank gets bitwise the same result.
  float32, float16, bfloat16; sum, max, min, avg. Messages larger than the data
  area (``PLAIT_IPC_BUFFER_BYTES``, 8 MiB) go in chunks.
- all_gather, reduce_scatter, broadcast through the data areas; send/recv through
  the inboxes (``PLAIT_IPC_INBOX_BYTES``, 4 MiB), sends on a side stream per peer.
- Waits on the GPU are bounded by ``timeout_s`` (the GPU's global timer); a wait
  that runs out lets its kernel finish and records what it waited for. The next
  operation, :meth:`IpcCommunicator.synchronize` or ``barrier`` raises
  :class:`~plait.errors.CommTimeoutError` naming rank, group and operation.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..errors import CommError, CommTimeoutError
from .base import Communicator, DoneHandle, Handle, RanksOfTorch
from .rendezvous import all_gather_text, describe_hosts, host_key
from .shm_config import _bytes_env, _pages
from .torch_backend import TorchCommunicator

REDUCIBLE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
OPS = {"sum": 0, "max": 1, "min": 2, "avg": 3}


def _extension():
    from plait import _C

    return _C


def ipc_local_status() -> tuple[bool, str]:
    """Whether this process can take part: plait._C built with CUDA, a GPU visible to torch."""
    try:
        _C = _extension()
    except ImportError as exc:
        return False, f"plait._C did not import ({exc})"
    if not _C.build_info()["cuda"]:
        return False, "plait._C was built without CUDA"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    return True, "ok"


def map_peers(comm: TorchCommunicator, create: Callable[[], Any], what: str) -> Any:
    """Collective: ``create()`` this rank's CUDA IPC object (IpcGroup, SymmetricBuffer), swap handles
    with every rank of ``comm`` and map the peers'. A failure on any rank raises CommError on
    every rank (outcomes are exchanged), naming ``what`` and each failing rank."""
    error, shared = "", None
    try:
        shared = create()
        handle = shared.handle().hex()
    except Exception as exc:  # noqa: BLE001 - any failure must reach every rank, or the others wait
        handle, error = "", f"{type(exc).__name__}: {exc}"
    handles = all_gather_text(comm, handle or "!" + error, width=256)
    failed = [f"group rank {r}: {h[1:]}" for r, h in enumerate(handles) if h.startswith("!")]
    if not failed:
        try:
            shared.open([bytes.fromhex(h) for h in handles])
        except Exception as exc:  # noqa: BLE001 - as above
            error = f"{type(exc).__name__}: {exc}"
        failed = [f"group rank {r}: {e}" for r, e in enumerate(all_gather_text(comm, error)) if e]
    if failed:
        raise CommError(f"{what}: " + "; ".join(failed))
    return shared


class IpcCommunicator(RanksOfTorch, Communicator):
    """Communicator over CUDA IPC buffers shared by the group's ranks (module docstring)."""

    backend = "ipc"

    @classmethod
    def usable_for(cls, comm: TorchCommunicator) -> tuple[bool, str]:
        """Collective over comm's group: can every rank map every other rank's GPU memory? (usable, why)"""
        ok, why = ipc_local_status()
        device = torch.cuda.current_device() if ok else -1
        facts = [row.split("#", 3) for row in all_gather_text(comm, f"{host_key()}#{device}#{int(ok)}#{why}")]
        bad = {r: reason for r, (_, _, good, reason) in enumerate(facts) if good != "1"}
        if len(bad) == comm.size and len(set(bad.values())) == 1:
            return False, f"on every rank: {bad[0]}"
        if bad:
            return False, "; ".join(f"group rank {r}: {reason}" for r, reason in bad.items())
        hosts = [f[0] for f in facts]
        if len(set(hosts)) > 1:
            return False, f"ranks on several hosts: {describe_hosts(hosts)}"
        if comm.size > _extension().ipc_max_ranks:
            return False, f"{comm.size} ranks; CUDA IPC groups here have at most {_extension().ipc_max_ranks}"
        devices = [int(f[1]) for f in facts]
        blocked = [d for d in sorted(set(devices)) if d != device and not _extension().cuda_can_access_peer(device, d)]
        verdicts = all_gather_text(comm, f"cuda:{device} cannot access cuda:{blocked}" if blocked else "")
        problems = [v for v in verdicts if v]
        if problems:
            return False, "no P2P access: " + "; ".join(problems)
        return True, f"devices {devices} on host {hosts[0].split('|')[0]}"

    def __init__(self, group=None, *, name: Optional[str] = None, timeout_s: Optional[float] = None) -> None:
        self._torch = TorchCommunicator(group, name=name, timeout_s=timeout_s)
        super().__init__(self._torch.name, timeout_s)
        ok, why = self.usable_for(self._torch)
        if not ok:
            raise CommError(f"{self.describe('ipc setup')}: CUDA IPC cannot serve this group: {why}; "
                            f"use Communicator.create('torch', group) or 'auto'")
        _C = _extension()
        self._C = _C
        self.device = torch.device("cuda", torch.cuda.current_device())
        data = _pages(_bytes_env("PLAIT_IPC_BUFFER_BYTES", 8 << 20))
        inbox = _pages(_bytes_env("PLAIT_IPC_INBOX_BYTES", 4 << 20))
        oneshot = _bytes_env("PLAIT_IPC_ONESHOT_BYTES", 256 << 10)
        self._send_streams: dict[int, torch.cuda.ExternalStream] = {}
        self._group = map_peers(self._torch, lambda: _C.IpcGroup(self.rank, self.size, self.device.index, data,
                                                                 inbox, oneshot), self.describe("ipc setup"))

    def reduces(self, dtype: torch.dtype) -> bool:
        """Whether all_reduce / reduce_scatter take ``dtype`` here (copies take any)."""
        return dtype in REDUCIBLE

    # ----------------------------------------------------------------- helpers
    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def _check(self, op: str) -> None:
        """Raise CommTimeoutError when an earlier GPU wait of this group timed out."""
        try:
            self._group.check()
        except self._C.IpcTimeout as exc:
            raise CommTimeoutError(f"{self.describe(op)}: an earlier operation on this group did not complete "
                                   f"within {self.timeout_s:g} s: {exc} (set PLAIT_TIMEOUT_S to change the bound)"
                                   ) from None
        except RuntimeError as exc:
            raise CommError(f"{self.describe(op)} failed: {exc}") from None

    def _prepare(self, tensor: torch.Tensor, op: str) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{op} takes a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != self.device:
            raise ValueError(f"{op}: the ipc backend handles CUDA tensors on {self.device}, got one on "
                             f"{tensor.device}; for CPU tensors use Communicator.create('shm', group) or 'auto'")
        self._check(op)

    def _reduce_code(self, tensor: torch.Tensor, op: str) -> int:
        if tensor.dtype not in REDUCIBLE:
            raise ValueError(f"{op}: the ipc backend reduces float32, float16 and bfloat16, not {tensor.dtype}; "
                             f"use Communicator.create('torch', group) (NCCL) for it, or 'auto'")
        return REDUCIBLE[tensor.dtype]

    def _call(self, op: str, fn, *args) -> None:
        try:
            fn(*args, self._stream(), self.timeout_s)
        except RuntimeError as exc:
            raise CommError(f"{self.describe(op)} failed: {exc}") from None

    def synchronize(self) -> None:
        """Wait for this rank's enqueued operations, then raise if any GPU wait timed out."""
        torch.cuda.current_stream(self.device).synchronize()
        self._check("synchronize")

    # -------------------------------------------------------------- collectives
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False):
        self._check_op(op)
        self._prepare(tensor, "all_reduce")
        dtype = self._reduce_code(tensor, "all_reduce")
        if self.size > 1 and tensor.numel() > 0:
            self._in_place(tensor, lambda buf: self._call("all_reduce", self._group.all_reduce, buf.data_ptr(),
                                                          buf.numel(), dtype, OPS[op]))
        return DoneHandle(tensor) if async_op else tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0, async_op: bool = False):
        self._prepare(tensor, "all_gather")
        dim = self._tensor_dim(tensor, dim, "all_gather")
        if self.size == 1:
            return DoneHandle(tensor) if async_op else tensor
        src = tensor.contiguous()
        out = torch.empty((self.size * src.shape[0], *src.shape[1:]), dtype=src.dtype, device=src.device)
        if src.numel() > 0:
            self._call("all_gather", self._group.all_gather, src.data_ptr(), out.data_ptr(),
                       src.numel() * src.element_size())
        result = out if dim == 0 else torch.cat(out.chunk(self.size, dim=0), dim=dim)
        return DoneHandle(result) if async_op else result

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0, op: str = "sum", async_op: bool = False):
        self._check_op(op)
        self._prepare(tensor, "reduce_scatter")
        dim = self._tensor_dim(tensor, dim, "reduce_scatter")
        self._check_divisible(tensor, dim, "reduce_scatter")
        dtype = self._reduce_code(tensor, "reduce_scatter")
        if self.size == 1:
            return DoneHandle(tensor) if async_op else tensor
        blocks = tensor.contiguous() if dim == 0 else torch.cat(tensor.chunk(self.size, dim=dim), dim=0)
        shape = list(tensor.shape)
        shape[dim] //= self.size
        out = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
        if out.numel() > 0:
            self._call("reduce_scatter", self._group.reduce_scatter, blocks.data_ptr(), out.data_ptr(), out.numel(),
                       dtype, OPS[op])
        return DoneHandle(out) if async_op else out

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False):
        self._check_peer(src, "src")
        self._prepare(tensor, "broadcast")
        if self.size > 1 and tensor.numel() > 0:
            self._in_place(tensor, lambda buf: self._call("broadcast", self._group.broadcast, buf.data_ptr(),
                                                          buf.numel() * buf.element_size(), src))
        return DoneHandle(tensor) if async_op else tensor

    def barrier(self) -> None:
        self._check("barrier")
        if self.size > 1:
            self._call("barrier", self._group.barrier)
        self.synchronize()

    # ---------------------------------------------------------- point to point
    def send(self, tensor: torch.Tensor, dst: int, async_op: bool = False):
        self._check_peer(dst, "dst")
        self._prepare(tensor, "send")
        self._check_not_self(dst, "send", "dst")
        src = tensor.contiguous()
        self._call("send", self._group.send, src.data_ptr(), src.numel() * src.element_size(), dst)
        # the side stream reads src: keep its memory from being reused before that
        side = self._send_stream(dst)
        src.record_stream(side)
        handle = _SendHandle(self._group, dst, side)
        return handle if async_op else handle.wait()

    def _send_stream(self, dst: int) -> torch.cuda.ExternalStream:
        """The side stream sends to ``dst`` run on (made once by the group, wrapped once here)."""
        stream = self._send_streams.get(dst)
        if stream is None:
            stream = self._send_streams[dst] = torch.cuda.ExternalStream(self._group.send_stream(dst),
                                                                         device=self.device)
        return stream

    def recv(self, tensor: torch.Tensor, src: int, async_op: bool = False):
        self._check_peer(src, "src")
        self._prepare(tensor, "recv")
        self._check_not_self(src, "recv", "src")
        if not tensor.is_contiguous():
            raise ValueError("recv needs a contiguous tensor to receive into")
        self._call("recv", self._group.recv, tensor.data_ptr(), tensor.numel() * tensor.element_size(), src)
        return DoneHandle(tensor) if async_op else tensor

    # ------------------------------------------------------------ user signals
    def flag_address(self, rank: int, index: int) -> int:
        """Device address of user flag ``index`` (< plait._C.ipc_user_flags) in group rank ``rank``'s
        buffer, for kernels that signal each other (e.g. a GEMM publishing finished tiles)."""
        return self._group.flag_address(rank, index)

    def set_flag(self, rank: int, index: int, value: int) -> None:
        """Enqueue: rank ``rank``'s user flag ``index`` = value (after everything before it on the stream)."""
        self._group.set_flag(rank, index, value, self._stream())

    def wait_flag(self, index: int, value: int) -> None:
        """Enqueue a wait (bounded by the timeout) until this rank's user flag ``index`` reaches value."""
        self._group.wait_flag(index, value, self._stream(), self.timeout_s)


class _SendHandle(Handle):
    """A send on its side stream; ``wait`` makes the current stream wait for it (as NCCL's work does)."""

    def __init__(self, group, dst: int, side: torch.cuda.ExternalStream) -> None:
        self._group, self._dst, self._side = group, dst, side

    def wait(self, timeout_s: Optional[float] = None) -> None:
        self._group.send_done(self._dst, torch.cuda.current_stream(self._side.device).cuda_stream)
        return None

    def is_completed(self) -> bool:
        return self._side.query()
