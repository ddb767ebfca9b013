"""Symmetric memory: one CUDA buffer per rank of an ``ipc`` group, mapped by every peer.

``SymmetricMemory(comm, data_bytes)`` is collective over the ranks of an
:class:`~plait.comm.IpcCommunicator`. Each rank's buffer is ``plait._C.symmetric_flags``
uint32 flags (zeroed) followed by ``data_bytes`` of data; :meth:`flags` and :meth:`data`
show any rank's part as a torch tensor (views of device memory this object owns, which
stays alive while such a view does). Kernels talk through it: a GEMM writes rows into
this rank's data area and publishes flags, peers wait for the flags
(:meth:`wait_flag`, or Triton kernels polling :meth:`flags`) and read the rows, or
:meth:`reduce_rows` sums rows over all ranks chunk by chunk as they are published. It
is the memory of ``overlap="fused"`` (:mod:`plait.tp.fused`).
"""
from __future__ import annotations

import torch

from ..errors import CommError, CommTimeoutError
from .ipc_backend import REDUCIBLE, IpcCommunicator, map_peers


class _DeviceBytes:
    """Raw device memory offered to ``torch.as_tensor`` through ``__cuda_array_interface__``.

    The tensor keeps this object, and through ``owner`` the allocation, alive.
    """

    def __init__(self, address: int, nbytes: int, owner: object) -> None:
        self.owner = owner
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False),
                                         "strides": None, "version": 2}


class SymmetricMemory:
    """This rank's symmetric buffer and the mapped buffers of its peers (module docstring)."""

    def __init__(self, comm: IpcCommunicator, data_bytes: int) -> None:
        if not isinstance(comm, IpcCommunicator):
            raise ValueError(f"SymmetricMemory needs an IpcCommunicator, got {type(comm).__name__}")
        if data_bytes < 1:
            raise ValueError(f"data_bytes must be positive, got {data_bytes}")
        from plait import _C

        self.comm = comm
        self.device = comm.device
        self._buffer = map_peers(comm._torch, lambda: _C.SymmetricBuffer(comm.rank, comm.size, comm.device.index,
                                                                          data_bytes),
                                 comm.describe("symmetric memory setup"))
        self.num_flags = _C.symmetric_flags
        self._timeout_type = _C.IpcTimeout

    @property
    def data_bytes(self) -> int:
        return self._buffer.data_bytes

    def _view(self, address: int, nbytes: int) -> torch.Tensor:
        # No device=: a peer's memory on another GPU must stay a view there, not be copied here.
        view = torch.as_tensor(_DeviceBytes(address, nbytes, self))
        if view.data_ptr() != address:
            raise CommError(f"{self.comm.describe('symmetric memory')}: torch copied device memory it was asked "
                            f"to view")
        return view

    def flags(self, rank: int) -> torch.Tensor:
        """Rank ``rank``'s flag area as an int32 tensor (Triton kernels publish and poll it)."""
        return self._view(self._buffer.flag_address(rank, 0), 4 * self.num_flags).view(torch.int32)

    def data(self, rank: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The start of rank ``rank``'s data area as a contiguous ``dtype`` tensor of ``shape``."""
        numel = 1
        for extent in shape:
            numel *= extent
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes > self.data_bytes:
            raise ValueError(f"{list(shape)} {dtype} needs {nbytes} bytes; the data area has {self.data_bytes}")
        raw = self._view(self._buffer.data_address(rank), self.data_bytes)
        return raw[:nbytes].view(dtype).view(shape)

    def _stream(self, stream) -> int:
        return (stream or torch.cuda.current_stream(self.device)).cuda_stream

    def set_flag(self, rank: int, index: int, value: int, stream=None) -> None:
        """Enqueue: rank ``rank``'s flag ``index`` = value, released after everything before it on the stream."""
        self._buffer.set_flag(rank, index, value, self._stream(stream))

    def wait_flag(self, rank: int, index: int, value: int, stream=None) -> None:
        """Enqueue a GPU wait (bounded by the communicator's timeout) until rank ``rank``'s flag ``index``
        reaches ``value``."""
        self._buffer.wait_flag(rank, index, value, self._stream(stream), self.comm.timeout_s)

    def reduce_rows(self, out: torch.Tensor, rows: int, row_range: tuple[int, int], rows_per_chunk: int,
                    first_flag: int, epoch: int, blocks: int, stream=None) -> None:
        """Enqueue: ``out`` = the rank-order sum over ranks of rows ``row_range`` of the ``[rows, N]``
        matrix at the start of every data area (``out``: ``[row_end - row_begin, N]``, row stride
        ``out.stride(0)``), chunk ``c`` of ``rows_per_chunk`` rows read once flag ``first_flag + c`` of
        every rank reached ``epoch``. ``blocks`` thread blocks (few: the GEMM keeps the rest)."""
        if out.dtype not in REDUCIBLE or out.device != self.device or out.dim() != 2 or out.stride(1) != 1:
            raise ValueError(f"reduce_rows: out must be a row-major 2-D float32/float16/bfloat16 tensor on "
                             f"{self.device}, got {list(out.shape)} {out.dtype} on {out.device}")
        begin, end = row_range
        if not 0 <= begin <= end <= rows or out.shape[0] != end - begin:
            raise ValueError(f"reduce_rows: row range {row_range} of {rows} rows does not fit out {list(out.shape)}")
        self._buffer.reduce_rows(out.data_ptr(), out.stride(0), REDUCIBLE[out.dtype], begin, end, out.shape[1],
                                 rows_per_chunk, first_flag, epoch, blocks, self._stream(stream),
                                 self.comm.timeout_s)

    def check(self, op: str) -> None:
        """Raise CommTimeoutError if a GPU wait on this memory timed out (reads host memory, no sync)."""
        try:
            self._buffer.check()
        except self._timeout_type as exc:
            raise CommTimeoutError(f"{self.comm.describe(op)}: an earlier fused operation did not complete within "
                                   f"{self.comm.timeout_s:g} s: {exc} (set PLAIT_TIMEOUT_S to change the bound)"
                                   ) from None
        except RuntimeError as exc:
            raise CommError(f"{self.comm.describe(op)} failed: {exc}") from None
