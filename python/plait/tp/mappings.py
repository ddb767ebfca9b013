"""Tensor-parallel region mappings: small autograd functions, one collective each.

Each function does one thing in forward and its adjoint in backward. ``comm``
is a :class:`plait.comm.Communicator` over the TP group.

=================================  ========================  ========================
function                           forward                   backward
=================================  ========================  ========================
copy_to_tp_region                  identity                  all-reduce
reduce_from_tp_region              all-reduce                identity
scatter_to_tp_region               split last dim            all-gather last dim
gather_from_tp_region              all-gather last dim       split last dim
scatter_to_sequence_region         split dim 0               all-gather dim 0
gather_from_sequence_region        all-gather dim 0          reduce-scatter dim 0
reduce_scatter_to_sequence_region  reduce-scatter dim 0      all-gather dim 0
=================================  ========================  ========================

Dim 0 is the sequence dim under sequence parallelism (``[seq, batch, hidden]``).
"""
from __future__ import annotations

import torch

from ..comm import Communicator


def _split(x: torch.Tensor, comm: Communicator, dim: int) -> torch.Tensor:
    if x.shape[dim] % comm.size:
        raise ValueError(f"cannot split dim {dim} of length {x.shape[dim]} into {comm.size} "
                         f"equal parts; make it a multiple of the TP size {comm.size}")
    return x.chunk(comm.size, dim=dim)[comm.rank].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_reduce(grad.contiguous()), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, in_place):
        if in_place and x.is_contiguous():
            ctx.mark_dirty(x)       # autograd refuses, rather than miscomputes, if x was needed elsewhere
            return comm.all_reduce(x)
        return comm.all_reduce(x.clone(memory_format=torch.contiguous_format))

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return _split(x, comm, -1)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_gather(grad, dim=-1), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return comm.all_gather(x, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.comm, -1), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return _split(x, comm, 0)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_gather(grad, dim=0), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return comm.all_gather(x, dim=0)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.reduce_scatter(grad, dim=0), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return comm.reduce_scatter(x, dim=0)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_gather(grad, dim=0), None


def copy_to_tp_region(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Identity forward; all-reduce the gradient (input replicated, used by sharded weights).

    With no gradient to track (inference, decode) ``x`` itself is returned: the autograd
    Function's bookkeeping costs about as much as a decode step's small GEMM setup."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return x
    return _CopyToTP.apply(x, comm)


def reduce_from_tp_region(x: torch.Tensor, comm: Communicator, *, in_place: bool = False) -> torch.Tensor:
    """All-reduce forward (sum partial results); identity backward. ``in_place=True`` reduces
    ``x`` itself instead of a copy: for a caller whose ``x`` is a temporary nothing else reads.

    In place with no gradient to track (inference, decode), the call goes straight to the
    communicator's in-place all-reduce, skipping the autograd Function's bookkeeping: with
    small decode messages that costs as much as the all-reduce itself.
    """
    if in_place and not (x.requires_grad and torch.is_grad_enabled()) and x.is_contiguous():
        return comm.all_reduce(x)
    return _ReduceFromTP.apply(x, comm, in_place)


def scatter_to_tp_region(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Keep this rank's block of the last dim; all-gather the gradient."""
    return _ScatterToTP.apply(x, comm)


def gather_from_tp_region(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """All-gather the last dim; backward keeps this rank's block of the gradient."""
    return _GatherFromTP.apply(x, comm)


def scatter_to_sequence_region(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Keep this rank's block of dim 0 (the sequence); all-gather the gradient."""
    return _ScatterToSequence.apply(x, comm)


def gather_from_sequence_region(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """All-gather dim 0; reduce-scatter the gradient (the SP entry of a column layer)."""
    return _GatherFromSequence.apply(x, comm)


def reduce_scatter_to_sequence_region(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Reduce-scatter dim 0; all-gather the gradient (the SP exit of a row layer)."""
    return _ReduceScatterToSequence.apply(x, comm)
