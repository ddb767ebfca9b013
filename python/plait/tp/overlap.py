"""Chunked overlap: split a GEMM into row chunks and hide each chunk's collective
behind the next chunk's GEMM, and overlap backward collectives with the GEMM
that does not depend on them.

Shapes (2-D views; rows are tokens, sequence-major under sequence parallelism,
``tp`` the group size, ``L`` the local rows of a sequence shard):

==========================  ===================  ===============  ==========================
function                    x                    out              collective, overlapped with
==========================  ===================  ===============  ==========================
column_linear_overlapped    [rows, K]            [rows, N/tp]     bwd: all-reduce dX || dW
  ... sequence_parallel     [L, K]               [tp*L, N/tp]     fwd: all-gather chunk i+1 || GEMM chunk i
                                                                  bwd: re-gather X || dX GEMM,
                                                                  reduce-scatter dX || dW
row_linear_overlapped       [rows, K/tp]         [rows, N]        fwd: all-reduce chunk i || GEMM chunk i+1
  ... sequence_parallel     [tp*L, K/tp]         [L, N]           fwd: reduce-scatter chunk i || GEMM chunk i+1
==========================  ===================  ===============  ==========================

Every rank of the group must pass the same number of rows (they do in TP: the
activations are replicated or evenly sharded), so all ranks cut the same chunks.

On CUDA the collectives run on the communicator's own stream (for the torch
backend: NCCL's per-group stream) and ``Handle.wait()`` makes the compute
stream wait on an event, never the host. Ordering between streams comes from
those events, not from launch order, so ``CUDA_DEVICE_MAX_CONNECTIONS=1`` is
not needed.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..comm import Communicator

MIN_ROWS_PER_CHUNK = 16


def row_ranges(rows: int, chunks: int) -> list[tuple[int, int]]:
    """Split ``range(rows)`` into at most ``chunks`` contiguous, near-equal, non-empty ranges."""
    chunks = max(1, min(chunks, rows))
    base, extra = divmod(rows, chunks)
    ranges, start = [], 0
    for i in range(chunks):
        stop = start + base + (1 if i < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def num_chunks(rows: int, requested: int) -> int:
    """Chunks to use for ``rows`` tokens: ``requested``, but no chunk under MIN_ROWS_PER_CHUNK rows."""
    return max(1, min(requested, rows // MIN_ROWS_PER_CHUNK))


def _save(ctx, x, x2, weight, bias, comm: Communicator, sequence_parallel: bool) -> None:
    """What both backwards need: the 2-D input and weight, and how the forward ran."""
    ctx.save_for_backward(x2, weight)
    ctx.comm, ctx.sequence_parallel, ctx.has_bias = comm, sequence_parallel, bias is not None
    ctx.x_shape = x.shape


def _weight_grads(ctx, grad2: torch.Tensor, x2: torch.Tensor):
    grad_w = grad2.t().mm(x2) if ctx.needs_input_grad[1] else None
    grad_b = grad2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_w, grad_b


class _ColumnLinearOverlapped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, comm: Communicator, sequence_parallel: bool, chunks: int):
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        if sequence_parallel:
            local = x2.shape[0]
            ranges = row_ranges(local, chunks)
            handles = [comm.all_gather(x2[a:b], dim=0, async_op=True) for a, b in ranges]
            out = torch.empty(comm.size, local, weight.shape[0], dtype=x.dtype, device=x.device)
            for (a, b), handle in zip(ranges, handles):
                gathered = handle.wait().view(comm.size, b - a, k)
                out[:, a:b] = torch.matmul(gathered, weight.t())
            out = out.view(comm.size * local, -1)
            if bias is not None:
                out.add_(bias)
            out_shape = (comm.size * x.shape[0], *x.shape[1:-1], weight.shape[0])
        else:
            out = torch.nn.functional.linear(x2, weight, bias)
            out_shape = (*x.shape[:-1], weight.shape[0])
        _save(ctx, x, x2, weight, bias, comm, sequence_parallel)
        return out.view(out_shape)

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        comm = ctx.comm
        grad2 = grad.reshape(-1, weight.shape[0])
        if ctx.sequence_parallel:
            regather = comm.all_gather(x2, dim=0, async_op=True)      # || dX GEMM
            grad_x = grad2.mm(weight) if ctx.needs_input_grad[0] else None
            x_full = regather.wait()
            reduce = comm.reduce_scatter(grad_x, dim=0, async_op=True) if grad_x is not None else None
            grad_w, grad_b = _weight_grads(ctx, grad2, x_full)        # || reduce-scatter dX
        else:
            grad_x = grad2.mm(weight) if ctx.needs_input_grad[0] else None
            reduce = comm.all_reduce(grad_x, async_op=True) if grad_x is not None else None
            grad_w, grad_b = _weight_grads(ctx, grad2, x2)            # || all-reduce dX
        if reduce is not None:
            grad_x = reduce.wait().view(ctx.x_shape)
        return grad_x, grad_w, grad_b, None, None, None


class _RowLinearOverlapped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, comm: Communicator, sequence_parallel: bool, chunks: int):
        k, n = x.shape[-1], weight.shape[0]
        x2 = x.reshape(-1, k)
        rows = x2.shape[0]
        if sequence_parallel:
            local = rows // comm.size
            x3 = x2.view(comm.size, local, k)
            out = torch.empty(local, n, dtype=x.dtype, device=x.device)
            pending = []
            for a, b in row_ranges(local, chunks):
                partial = torch.matmul(x3[:, a:b], weight.t()).view(-1, n)
                pending.append((a, b, comm.reduce_scatter(partial, dim=0, async_op=True)))
            for a, b, handle in pending:
                out[a:b] = handle.wait()
            out_shape = (x.shape[0] // comm.size, *x.shape[1:-1], n)
        else:
            out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
            pending = []
            for a, b in row_ranges(rows, chunks):
                torch.mm(x2[a:b], weight.t(), out=out[a:b])
                pending.append(comm.all_reduce(out[a:b], async_op=True))
            for handle in pending:
                handle.wait()
            out_shape = (*x.shape[:-1], n)
        if bias is not None:
            out.add_(bias)
        _save(ctx, x, x2, weight, bias, comm, sequence_parallel)
        return out.view(out_shape)

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, weight.shape[0])
        if ctx.sequence_parallel:
            grad2 = ctx.comm.all_gather(grad2, dim=0)   # every rank now holds the full-sequence grad
        grad_x = grad2.mm(weight).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w, grad_b = _weight_grads(ctx, grad2, x2)
        return grad_x, grad_w, grad_b, None, None, None


def column_linear_overlapped(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             comm: Communicator, sequence_parallel: bool, chunks: int) -> torch.Tensor:
    """Column-parallel ``x @ weight.T + bias`` with the collectives overlapped (see table)."""
    return _ColumnLinearOverlapped.apply(x, weight, bias, comm, sequence_parallel, chunks)


def row_linear_overlapped(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          comm: Communicator, sequence_parallel: bool, chunks: int) -> torch.Tensor:
    """Row-parallel ``x @ weight.T`` reduced across the group, ``+ bias``, overlapped (see table)."""
    return _RowLinearOverlapped.apply(x, weight, bias, comm, sequence_parallel, chunks)
