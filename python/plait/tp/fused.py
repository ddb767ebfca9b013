"""``overlap="fused"``: a GEMM and its collective overlapped chunk by chunk of rows, on the GPU.

Runs between the GPU processes of one node through :class:`~plait.comm.symmetric.SymmetricMemory`
(one buffer per rank, mapped by every peer over CUDA IPC); no host involvement between chunks.

RowParallelLinear (all-reduce; reduce-scatter under sequence parallelism)
    The producer GEMM (:func:`plait.kernels.producer_linear`) writes this rank's partial
    product into its data area and, as each chunk of rows is complete, publishes flag
    ``READY + chunk = epoch``. On a side stream, :meth:`SymmetricMemory.reduce_rows`
    (``REDUCE_BLOCKS`` thread blocks) waits for each chunk on every rank and sums it into
    the output while the GEMM computes later chunks; under sequence parallelism it sums only
    this rank's rows. What is left after the GEMM is the last chunk's reduction.
ColumnParallelLinear with sequence parallelism (all-gather)
    This rank copies its sequence shard into its data area and raises ``SHARD``; a side stream
    copies each peer's shard, once raised, into the gathered input and raises ``GATHERED + peer``;
    the consumer GEMM (:func:`plait.kernels.consumer_linear`) awaits those flags tile by tile,
    so it computes on the shards already present while the others arrive.

Every call takes the next epoch, the same on every rank (the ranks of a TP group make the
same calls with the same shapes). Before a rank writes its data area it waits until every
peer raised ``DONE + peer`` in its flag area for the previous epoch (peer finished reading),
so one buffer serves every fused layer in turn without a barrier.

The backward passes are the chunked path's (:mod:`plait.tp.overlap`): the row layer has no
collective in backward without sequence parallelism, and the column layer's re-gather and
reduce-scatter overlap its GEMMs there.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..comm import Communicator, CommTimeoutError
from .activations import FUSED_DTYPES
from .overlap import _ColumnLinearOverlapped, _RowLinearOverlapped, _save, column_linear_overlapped, \
    row_linear_overlapped

READY, GATHERED, SHARD, DONE = 0, 2048, 2056, 2064   # flag indices (module docstring)
MAX_CHUNKS = GATHERED - READY
REDUCE_BLOCKS = 8        # thread blocks of the side-stream reduction: the GEMM keeps the other SMs
CONSUMER_SPARE_SMS = 4   # SMs the consumer GEMM leaves free for the side stream's copies and flags
CHUNK_ROW_MULTIPLE = 128  # chunks end on producer tile rows (BM) so no tile feeds two chunks


def ipc_communicator(comm: Communicator):
    """The IpcCommunicator behind ``comm`` (itself, or the one an ``auto`` communicator routes CUDA to)."""
    from ..comm import IpcCommunicator

    if isinstance(comm, IpcCommunicator):
        return comm
    routed = getattr(comm, "_backends", {}).get("ipc")
    if routed is not None:
        return routed
    raise ValueError(f"overlap='fused' runs over plait's CUDA IPC communicator, but this layer's group uses the "
                     f"{comm.backend!r} backend; pass group=Communicator.create('ipc', group) (or 'auto' where "
                     f"CUDA IPC applies), or use overlap='chunked'")


def check_fused(module: str, x: torch.Tensor, comm: Communicator) -> None:
    """Reject what the fused path cannot run, before any communication (a rank that failed
    after taking an epoch would leave the group's epochs out of step). The layers have already
    checked that the weight matches ``x`` in dtype and device (``check_input``)."""
    if not x.is_cuda:
        raise ValueError(f"{module}: overlap='fused' runs on CUDA tensors, got one on {x.device}; "
                         f"use overlap='chunked' or 'none' on CPU")
    if x.dtype not in FUSED_DTYPES:
        raise ValueError(f"{module}: overlap='fused' takes float32, float16 or bfloat16, not {x.dtype}; "
                         f"use overlap='chunked' for it")
    from .. import kernels

    if not kernels.HAVE_TRITON:
        raise ValueError(f"{module}: overlap='fused' needs Triton, which is not installed")
    ipc = ipc_communicator(comm)
    if x.device != ipc.device:
        raise ValueError(f"{module}: input is on {x.device} but the IPC communicator serves {ipc.device}; "
                         f"call torch.cuda.set_device before creating the communicator")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class FusedWorkspace:
    """One TP group's symmetric memory, side stream, epochs and signal scratch (module docstring)."""

    def __init__(self, comm) -> None:
        self.comm = comm
        self.device = comm.device
        self.memory = None
        self.epoch = 0
        self.side = torch.cuda.Stream(self.device)
        self.counters = torch.zeros(MAX_CHUNKS, dtype=torch.int32, device=self.device)
        self.error = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.error_host = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self.error_copied: Optional[torch.cuda.Event] = None   # error_host holds a finished call's word
        self.sms = torch.cuda.get_device_properties(self.device).multi_processor_count

    def _reserve(self, nbytes: int) -> None:
        """Make the data area hold ``nbytes``; collective (every rank asks at the same call)."""
        from ..comm.symmetric import SymmetricMemory

        if self.memory is not None and self.memory.data_bytes >= nbytes:
            return
        grown = max(nbytes, 2 * self.memory.data_bytes) if self.memory is not None else nbytes
        if self.memory is not None:
            torch.cuda.synchronize(self.device)   # nothing of ours still reads or writes the old buffers
            self.comm.barrier()                   # nor a peer's
            self.memory = None
        self.memory = SymmetricMemory(self.comm, grown)
        self.epoch = 0                            # fresh flags are zero

    def begin(self, nbytes: int, op: str) -> int:
        """Start a fused call writing ``nbytes`` to this rank's data area: surface an earlier timeout,
        take the next epoch, and make the current stream wait until every peer finished reading."""
        if self.memory is not None:
            self.memory.check(op)
        if self.error_copied is not None and self.error_copied.query() and int(self.error_host.item()):
            code, self.error_host[0] = int(self.error_host.item()), 0
            raise CommTimeoutError(f"{self.comm.describe(op)}: an earlier fused consumer GEMM gave up waiting "
                                   f"for chunk {code - 1} within {self.comm.timeout_s:g} s (a peer never "
                                   f"published it)")
        self._reserve(nbytes)
        self.epoch += 1
        if self.epoch > 1:
            for peer in range(self.comm.size):
                if peer != self.comm.rank:
                    self.memory.wait_flag(self.comm.rank, DONE + peer, self.epoch - 1)
        return self.epoch

    def finish_reading(self, epoch: int, stream: torch.cuda.Stream) -> None:
        """On ``stream``, after its reads of every peer's data area: tell each peer it may reuse it."""
        for peer in range(self.comm.size):
            if peer != self.comm.rank:
                self.memory.set_flag(peer, DONE + self.comm.rank, epoch, stream)


def workspace(comm: Communicator) -> FusedWorkspace:
    """The FusedWorkspace of ``comm``'s IPC communicator, kept on it (its memory lives as long as the
    communicator; every rank's GPU work must be finished, e.g. by ``destroy_mesh()``, before exit)."""
    ipc = ipc_communicator(comm)
    found = getattr(ipc, "_fused_workspace", None)
    if found is None:
        found = ipc._fused_workspace = FusedWorkspace(ipc)
    return found


def chunk_rows(rows: int, chunks: int) -> int:
    """Rows per chunk (``rows`` > 0): ``rows / chunks`` rounded up to whole producer tiles, at most
    MAX_CHUNKS chunks."""
    per = _cdiv(_cdiv(rows, max(1, chunks)), CHUNK_ROW_MULTIPLE) * CHUNK_ROW_MULTIPLE
    return max(per, _cdiv(rows, MAX_CHUNKS))


def row_forward(ws: FusedWorkspace, x2: torch.Tensor, weight: torch.Tensor, sequence_parallel: bool,
                chunks: int) -> torch.Tensor:
    """All-reduce (or reduce-scatter) of ``x2 @ weight.T`` over the group, overlapped with the GEMM."""
    from ..kernels import ChunkSignals, producer_linear

    from ..kernels.linear import check_linear_args

    check_linear_args(x2, weight, None, None, None, None)   # before the epoch: a failure after it strands peers
    rows, n = x2.shape[0], weight.shape[0]
    epoch = ws.begin(rows * n * x2.element_size(), "fused row-parallel all-reduce")
    mem, rank = ws.memory, ws.comm.rank
    per = chunk_rows(rows, chunks)
    count = _cdiv(rows, per)
    local = rows // ws.comm.size if sequence_parallel else rows
    begin = rank * local if sequence_parallel else 0
    out = torch.empty(local, n, dtype=x2.dtype, device=x2.device)
    main = torch.cuda.current_stream(ws.device)
    ready = torch.cuda.Event()
    ready.record(main)                    # out's memory and the DONE waits come before the reduction
    signals = ChunkSignals(flags=mem.flags(rank)[READY:READY + count], counters=ws.counters[:count],
                           error=ws.error, rows_per_chunk=per)
    # The GEMM is launched first: a host error (or a first-call compile) happens before anything spins.
    producer_linear(x2, weight, signals=signals, epoch=epoch, out=mem.data(rank, x2.dtype, (rows, n)),
                    programs=max(1, ws.sms - REDUCE_BLOCKS))
    ws.side.wait_event(ready)
    mem.reduce_rows(out, rows, (begin, begin + local), per, READY, epoch, REDUCE_BLOCKS, stream=ws.side)
    ws.finish_reading(epoch, ws.side)
    out.record_stream(ws.side)
    main.wait_stream(ws.side)
    return out


def column_sp_forward(ws: FusedWorkspace, x2: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``all_gather(x2) @ weight.T + bias``, the GEMM consuming each peer's shard as it arrives."""
    from ..kernels import ChunkSignals, consumer_linear

    from ..kernels.linear import check_linear_args

    check_linear_args(x2, weight, bias, None, None, None)   # before the epoch: a failure after it strands peers
    local, k = x2.shape
    size, rank = ws.comm.size, ws.comm.rank
    epoch = ws.begin(local * k * x2.element_size(), "fused column-parallel all-gather")
    mem = ws.memory
    main = torch.cuda.current_stream(ws.device)
    mem.data(rank, x2.dtype, (local, k)).copy_(x2)
    mem.set_flag(rank, SHARD, epoch)
    gathered = torch.empty(size * local, k, dtype=x2.dtype, device=x2.device)
    gathered[rank * local:(rank + 1) * local].copy_(x2)
    mem.set_flag(rank, GATHERED + rank, epoch)
    ws.side.wait_stream(main)
    with torch.cuda.stream(ws.side):
        for step in range(1, size):
            peer = (rank + step) % size
            mem.wait_flag(peer, SHARD, epoch, ws.side)
            gathered[peer * local:(peer + 1) * local].copy_(mem.data(peer, x2.dtype, (local, k)))
            mem.set_flag(rank, GATHERED + peer, epoch, ws.side)
    ws.finish_reading(epoch, ws.side)
    gathered.record_stream(ws.side)
    signals = ChunkSignals(flags=mem.flags(rank)[GATHERED:GATHERED + size], counters=ws.counters[:size],
                           error=ws.error, rows_per_chunk=local)
    y = consumer_linear(gathered, weight, bias, signals=signals, epoch=epoch, timeout_s=ws.comm.timeout_s,
                        programs=max(1, ws.sms - CONSUMER_SPARE_SMS))
    ws.error_host.copy_(ws.error, non_blocking=True)   # read by a later call's begin() once copied
    ws.error_copied = torch.cuda.Event()
    ws.error_copied.record(main)
    main.wait_stream(ws.side)
    return y


class _RowLinearFused(_RowLinearOverlapped):
    """Forward fused (row_forward); backward inherited from the chunked path."""

    @staticmethod
    def forward(ctx, x, weight, bias, comm: Communicator, sequence_parallel: bool, chunks: int):
        k, n = x.shape[-1], weight.shape[0]
        x2 = x.reshape(-1, k)
        out = row_forward(workspace(comm), x2, weight, sequence_parallel, chunks)
        if bias is not None:
            out.add_(bias)
        _save(ctx, x, x2, weight, bias, comm, sequence_parallel)
        lead = (x.shape[0] // comm.size, *x.shape[1:-1]) if sequence_parallel else x.shape[:-1]
        return out.view(*lead, n)


class _ColumnLinearFused(_ColumnLinearOverlapped):
    """Sequence-parallel forward fused (column_sp_forward); backward inherited from the chunked path."""

    @staticmethod
    def forward(ctx, x, weight, bias, comm: Communicator, sequence_parallel: bool, chunks: int):
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        out = column_sp_forward(workspace(comm), x2, weight, bias)
        _save(ctx, x, x2, weight, bias, comm, sequence_parallel)
        return out.view(comm.size * x.shape[0], *x.shape[1:-1], weight.shape[0])


def row_linear_fused(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], comm: Communicator,
                     sequence_parallel: bool, chunks: int) -> torch.Tensor:
    """Row-parallel ``x @ weight.T`` reduced across the group, ``+ bias``, reduction fused with the GEMM.
    An empty input (the same on every rank of the group) takes the chunked path."""
    if x.numel() == 0:
        return row_linear_overlapped(x, weight, bias, comm, sequence_parallel, chunks)
    return _RowLinearFused.apply(x, weight, bias, comm, sequence_parallel, chunks)


def column_linear_fused(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        comm: Communicator) -> torch.Tensor:
    """Sequence-parallel column ``all_gather(x) @ weight.T + bias``, the gather fused with the GEMM.
    An empty input (the same on every rank of the group) takes the chunked path."""
    if x.numel() == 0:
        return column_linear_overlapped(x, weight, bias, comm, True, 1)
    return _ColumnLinearFused.apply(x, weight, bias, comm, True, 1)
