"""ColumnParallelLinear and RowParallelLinear: drop-in replacements for ``nn.Linear``.

Weights are split in contiguous blocks over the TP group (``tp`` ranks, rank ``r``):

==========================  ================================  ===========================
layer                       weight on rank r                  bias on rank r
==========================  ================================  ===========================
ColumnParallelLinear(K, N)  rows ``[r*N/tp, (r+1)*N/tp)``     same rows (sharded)
RowParallelLinear(K, N)     cols ``[r*K/tp, (r+1)*K/tp)``     all N (replicated)
==========================  ================================  ===========================

Input and output shapes (``S`` the sequence dim, dim 0 under sequence parallelism):

==========================================  =====================  =====================
configuration                               input                  output
==========================================  =====================  =====================
Column                                      [..., K]               [..., N/tp]
Column gather_output=True                   [..., K]               [..., N]
Column sequence_parallel=True               [S/tp, ..., K]         [S, ..., N/tp]
Row (input_is_parallel=True)                [..., K/tp]            [..., N]
Row input_is_parallel=False                 [..., K]               [..., N]
Row sequence_parallel=True                  [S, ..., K/tp]         [S/tp, ..., N]
==========================================  =====================  =====================

A column layer followed by a row layer (an MLP, attention) needs one
all-reduce forward and one backward, or all-gather + reduce-scatter under SP.

On CUDA with Triton the non-overlapped path runs GEMM, bias and activation as
one ``plait.kernels.fused_linear`` kernel (its backward fused too); on CPU it
runs ``F.linear`` and the activation. The chunked path runs torch GEMMs.

``overlap`` is "none", "chunked" (:mod:`plait.tp.overlap`: row chunks, each
chunk's collective hidden behind the next chunk's GEMM), "fused" (CUDA with
plait's IPC communicator, :mod:`plait.tp.fused`: the collective runs beside
the Triton GEMM, chunk by chunk as flags say rows are ready; a column layer
without sequence parallelism has no forward collective and runs as "none")
or "auto" (:func:`plait.tp.common.resolve_overlap`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..comm.agree import check_agreement
from .activations import apply_activation, check_activation, linear_activation
from .common import check_input, check_overlap, divide, init_full_linear, resolve_comm, resolve_overlap
from .mappings import (copy_to_tp_region, gather_from_sequence_region, gather_from_tp_region,
                       reduce_from_tp_region, reduce_scatter_to_sequence_region, scatter_to_tp_region)
from .fused import check_fused, column_linear_fused, row_linear_fused
from .overlap import column_linear_overlapped, num_chunks, row_linear_overlapped


def check_sizes(module: str, **sizes: object) -> None:
    """ValueError naming the first of `sizes` that is not a whole number >= 1 (torch would fail later,
    less clearly, or build an empty layer)."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{module}: {name} must be a whole number >= 1, got {value!r}")


class _ParallelLinear(nn.Module):
    """What both layers share: the group, the overlap mode, parameters drawn like nn.Linear."""

    split_dim: int  # dim of the full weight that is sharded: 0 for column, 1 for row

    def __init__(self, in_features: int, out_features: int, bias: bool, sequence_parallel: bool,
                 overlap: str, group, overlap_chunks: int, dtype, device, check_ranks: bool,
                 options: dict) -> None:
        super().__init__()
        check_sizes(type(self).__name__, in_features=in_features, out_features=out_features)
        if not isinstance(overlap_chunks, int) or overlap_chunks < 1:
            raise ValueError(f"overlap_chunks must be a positive int, got {overlap_chunks!r}")
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel = bool(sequence_parallel)
        self.overlap = check_overlap(overlap)
        self.overlap_chunks = overlap_chunks
        self.comm = resolve_comm(group)
        self.tp_size, self.tp_rank = self.comm.size, self.comm.rank
        if check_ranks:
            # Before the checks that depend on the sizes: ranks given different sizes learn so together.
            check_agreement({"in_features": in_features, "out_features": out_features, "bias": bool(bias),
                             "dtype": dtype or torch.get_default_dtype(),
                             "device": torch.device(device or "cpu").type,
                             "sequence_parallel": self.sequence_parallel, "overlap": overlap, **options},
                            self.comm, what=type(self).__name__)
        full_features = out_features if self.split_dim == 0 else in_features
        per_rank = divide(full_features, self.tp_size,
                          "out_features" if self.split_dim == 0 else "in_features")
        weight, full_bias = init_full_linear(out_features, in_features, bias, dtype, device)
        block = slice(self.tp_rank * per_rank, (self.tp_rank + 1) * per_rank)
        shard = weight[block] if self.split_dim == 0 else weight[:, block]
        self.weight = nn.Parameter(shard.contiguous())
        self.weight.tp_split_dim = self.split_dim
        if full_bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter((full_bias[block] if self.split_dim == 0 else full_bias).contiguous())
            self.bias.tp_split_dim = 0 if self.split_dim == 0 else None

    # ------------------------------------------------------------ conversions
    @classmethod
    def from_linear(cls, dense: nn.Linear, group=None, **layer_kwargs):
        """Shard an existing ``nn.Linear`` over the TP group (every rank passes the same layer)."""
        if not isinstance(dense, nn.Linear):
            raise ValueError(f"from_linear needs an nn.Linear, got {type(dense).__name__}")
        layer = cls(dense.in_features, dense.out_features, bias=dense.bias is not None, group=group,
                    dtype=dense.weight.dtype, device=dense.weight.device, **layer_kwargs)
        with torch.no_grad():
            per_rank = layer.weight.shape[cls.split_dim]
            block = slice(layer.tp_rank * per_rank, (layer.tp_rank + 1) * per_rank)
            layer.weight.copy_(dense.weight[block] if cls.split_dim == 0 else dense.weight[:, block])
            if dense.bias is not None:
                layer.bias.copy_(dense.bias[block] if cls.split_dim == 0 else dense.bias)
        return layer

    def to_linear(self) -> nn.Linear:
        """Gather the shards into one ``nn.Linear`` (a collective: every rank of the group calls it)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          dtype=self.weight.dtype, device=self.weight.device)
        with torch.no_grad():
            dense.weight.copy_(self.comm.all_gather(self.weight.detach(), dim=self.split_dim))
            if self.bias is not None:
                bias = self.bias.detach()
                dense.bias.copy_(self.comm.all_gather(bias, dim=0) if self.split_dim == 0 else bias)
        return dense

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, tp={self.tp_size}, sequence_parallel={self.sequence_parallel}, "
                f"overlap={self.overlap!r}")


class ColumnParallelLinear(_ParallelLinear):
    """``activation(x @ W.T + b)`` with ``W``'s output rows split over the TP group.

    ``gather_output=True`` all-gathers the features so every rank gets ``[..., N]``;
    leave it False before a :class:`RowParallelLinear`. ``sequence_parallel=True``
    takes a sequence shard ``[S/tp, ..., K]`` and all-gathers it (overlapped
    chunk by chunk with the GEMM when ``overlap`` is "chunked" or "auto").
    ``group``: a ProcessGroup, a Communicator, or None (the mesh's TP axis, else WORLD).
    ``check_ranks`` (default True): on construction, check that every rank of the group
    builds the same layer (sizes, dtype, options) with one small all-gather, so a mismatch
    is a ValueError on every rank instead of a crash in the first forward; turn it off when
    building many layers and checking the whole model once.
    """

    split_dim = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 sequence_parallel: bool = False, activation: Optional[str] = None, overlap: str = "auto",
                 group=None, *, overlap_chunks: int = 4, dtype: Optional[torch.dtype] = None,
                 device=None, check_ranks: bool = True) -> None:
        self.activation = check_activation(activation)
        if gather_output and sequence_parallel:
            raise ValueError("gather_output=True cannot be combined with sequence_parallel=True: the "
                             "output is already full-sequence; follow with a RowParallelLinear instead")
        self.gather_output = bool(gather_output)
        super().__init__(in_features, out_features, bias, sequence_parallel, overlap, group,
                         overlap_chunks, dtype, device, check_ranks,
                         {"gather_output": self.gather_output, "activation": self.activation})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("ColumnParallelLinear", x, self.in_features, self.weight)
        if self.sequence_parallel and x.dim() < 2:
            raise ValueError(f"ColumnParallelLinear(sequence_parallel=True) needs [seq, ..., features] "
                             f"input with the sequence shard in dim 0, got shape {list(x.shape)}")
        mode = resolve_overlap(self.overlap, self.comm, x.device)
        if mode == "fused":
            check_fused("ColumnParallelLinear", x, self.comm)
        if mode == "fused" and self.sequence_parallel:
            y = apply_activation(column_linear_fused(x, self.weight, self.bias, self.comm), self.activation)
        elif mode == "chunked":
            rows = x.numel() // max(x.shape[-1], 1)
            y = column_linear_overlapped(x, self.weight, self.bias, self.comm, self.sequence_parallel,
                                         num_chunks(rows, self.overlap_chunks))
            y = apply_activation(y, self.activation)
        else:
            x = (gather_from_sequence_region(x, self.comm) if self.sequence_parallel
                 else copy_to_tp_region(x, self.comm))
            y = linear_activation(x, self.weight, self.bias, self.activation)
        return gather_from_tp_region(y, self.comm) if self.gather_output else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation!r}, gather_output={self.gather_output}"


class RowParallelLinear(_ParallelLinear):
    """``x @ W.T + b`` with ``W``'s input columns split over the TP group; partial sums reduced.

    With ``input_is_parallel=True`` (after a :class:`ColumnParallelLinear`) the input
    is this rank's feature block ``[..., K/tp]``; otherwise the full input is split
    here. The partial products are all-reduced, or reduce-scattered along the
    sequence (dim 0) with ``sequence_parallel=True``; the bias is added once, after.
    ``check_ranks`` as for :class:`ColumnParallelLinear`.
    """

    split_dim = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True,
                 sequence_parallel: bool = False, overlap: str = "auto", group=None, *,
                 overlap_chunks: int = 4, dtype: Optional[torch.dtype] = None, device=None,
                 check_ranks: bool = True) -> None:
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel=True needs input_is_parallel=True (the input must be "
                             "the feature shard a ColumnParallelLinear produced)")
        self.input_is_parallel = bool(input_is_parallel)
        super().__init__(in_features, out_features, bias, sequence_parallel, overlap, group,
                         overlap_chunks, dtype, device, check_ranks, {"input_is_parallel": self.input_is_parallel})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.weight.shape[1] if self.input_is_parallel else self.in_features
        check_input("RowParallelLinear", x, features, self.weight)
        if self.sequence_parallel and (x.dim() < 2 or x.shape[0] % self.tp_size):
            raise ValueError(f"RowParallelLinear(sequence_parallel=True) reduce-scatters dim 0 (the "
                             f"sequence) over {self.tp_size} ranks, but the input has shape {list(x.shape)}; "
                             f"make the sequence length a multiple of {self.tp_size}")
        mode = resolve_overlap(self.overlap, self.comm, x.device)
        if mode == "fused":
            check_fused("RowParallelLinear", x, self.comm)
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.comm)
        if mode == "fused":
            return row_linear_fused(x, self.weight, self.bias, self.comm, self.sequence_parallel,
                                    self.overlap_chunks)
        if mode == "chunked":
            rows = x.numel() // max(x.shape[-1], 1)
            local_rows = rows // self.tp_size if self.sequence_parallel else rows
            return row_linear_overlapped(x, self.weight, self.bias, self.comm, self.sequence_parallel,
                                         num_chunks(local_rows, self.overlap_chunks))
        y = linear_activation(x, self.weight, None, None)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_region(y, self.comm)
            # Each rank sees only its sequence shard of dY: all-reduce the bias gradient.
            bias = copy_to_tp_region(self.bias, self.comm) if self.bias is not None else None
        else:
            y = reduce_from_tp_region(y, self.comm, in_place=True)   # y: this layer's own GEMM output
            bias = self.bias
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return super().extra_repr() + f", input_is_parallel={self.input_is_parallel}"
