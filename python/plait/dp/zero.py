"""ZeRO-1: optimizer state sharded over data parallelism.

Plain DP keeps a full copy of the optimizer state on every DP rank (AdamW: two
moments, 2x the parameters). ZeRO stage 1 gives each of the ``dp`` ranks the
state of only ``1/dp`` of the parameters::

    zero = ShardedOptimizer(model.parameters(), torch.optim.AdamW, mesh.dp_comm, lr=1e-3)
    for step in ...:
        zero.start_step(num_microbatches)
        for mb in microbatches: loss(mb).backward()      # or a PipelineEngine step
        zero.finish()            # gradients reduce-scattered: this rank holds the DP mean of its shard
        zero.clip_grad_norm_(1.0)                        # optional
        zero.step()              # update the shard, all-gather the parameters
        zero.zero_grad()

How. The gradient buckets of :class:`~plait.dp.GradReducer` (padded to a
multiple of ``dp`` elements) are reduce-scattered instead of all-reduced, from
the same backward hooks, so the reduction still starts during the last
microbatch's backward; each result is copied back into the rank's own range
of the bucket. Every bucket has a flat parameter buffer of the same layout; the
parameters become views into it, and this rank's range of it,
``[rank * n/dp, (rank + 1) * n/dp)``, cut at parameter boundaries
(:mod:`plait.dp.shards`), is what the wrapped torch optimizer updates. Then
each bucket's ranges are all-gathered back into the buffer, so every rank
again holds all parameters.

Which optimizers. Sharding the flat buffer is exact only when the update of
an element depends on that element alone (its gradient, its state, scalars
such as the step count): SGD, Adam, AdamW, RMSprop... (:data:`ELEMENTWISE`).
LAMB/LARS-like per-tensor norms would be silently wrong, so any other class is
refused unless ``elementwise=True`` vouches for it.

Memory per rank, ``P`` parameters of ``b`` bytes, Adam: plain DP holds
``2 P b`` of state; ZeRO-1 holds ``2 (P + pad) b / dp`` (the padding is under
``dp`` elements per bucket). The parameters are not copied: what the optimizer
updates are views of the flat parameter buffers. Transient: the reduce-scatter
results (``P b / dp`` at the end of backward) and at most two gathered buckets
during :meth:`ShardedOptimizer.step`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..comm import Communicator, Handle
from .buckets import Bucket
from .clip import check_max_norm, clip_gradients
from .grads import GradReducer
from .shards import Piece, flatten_params, shard_pieces, shard_range
from .zero_state import gather_state, load_state

ELEMENTWISE: tuple[type, ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.Adagrad,
    torch.optim.Adadelta, torch.optim.RMSprop, torch.optim.Rprop, torch.optim.NAdam, torch.optim.RAdam)
"""Torch optimizers whose update is elementwise per parameter, so sharding a flat buffer is exact."""


class _ShardReducer(GradReducer):
    """GradReducer whose bucket reduction is a reduce-scatter: each rank gets the DP mean of its shard."""

    def _reduce(self, bucket: Bucket) -> Handle:
        return self.comm.reduce_scatter(bucket.buffer, dim=0, op="avg", async_op=True)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held by the tensors of an optimizer's state (a torch optimizer or a :class:`ShardedOptimizer`)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


class ShardedOptimizer:
    """A torch optimizer whose state is sharded over the DP communicator ``comm`` (ZeRO stage 1).

    ``optimizer_class(pieces, **optimizer_kwargs)`` is built over this rank's
    slices of the flat parameter buffers (:mod:`plait.dp.shards`). It is also
    the DP gradient reducer of the step: call :meth:`start_step`, run backward,
    :meth:`finish`, then :meth:`step`; see the module doc. After :meth:`finish`
    only this rank's range of each ``.grad`` holds the DP mean (the rest is the
    local gradient). Every DP rank must pass the same parameter shapes in the
    same order (checked). Parameters that do not require grad are left alone.

    The parameters' ``.data`` become views of the flat buffers. Build it after
    the model is on its device and dtype: whatever replaces ``param.data``
    afterwards (``model.to(...)``, ``.half()``) unlinks the parameters from the
    buffers, and :meth:`step` would update the buffers, not the model.
    """

    def __init__(self, params: Iterable[nn.Parameter], optimizer_class: type, comm: Communicator, *,
                 bucket_mb: float = 25.0, overlap: bool = True, elementwise: Optional[bool] = None,
                 **optimizer_kwargs: Any) -> None:
        params = list(params)
        _check_arguments(params, optimizer_class, comm, elementwise)
        self.comm = comm
        self.reducer = _ShardReducer(params, comm, bucket_mb, overlap, pad_to=comm.size)
        self.buckets: list[Bucket] = self.reducer.buckets
        try:
            self._check_same_buckets_on_every_rank()
        except ValueError:
            self.reducer.remove()   # nothing of a failed optimizer stays on the parameters
            for bucket in self.buckets:
                for param in bucket.params:
                    param.grad = None
            raise
        self.flat_params: list[torch.Tensor] = [flatten_params(bucket) for bucket in self.buckets]
        self.pieces: list[list[Piece]] = [shard_pieces(bucket, flat, comm.rank, comm.size)
                                          for bucket, flat in zip(self.buckets, self.flat_params)]
        tensors = [piece.tensor for mine in self.pieces for piece in mine]
        self.optimizer: torch.optim.Optimizer = optimizer_class(tensors, **optimizer_kwargs)
        self._scalar_keys = _scalar_state_keys(optimizer_class, optimizer_kwargs, tensors[0])
        self._reduced = False

    def _check_same_buckets_on_every_rank(self) -> None:
        """ValueError on every rank when DP ranks built different buckets (they would exchange garbage)."""
        sizes = [b.numel for b in self.buckets]
        # a fixed-size summary, so ranks that disagree on the bucket count still exchange equal shapes
        summary = torch.tensor([[len(sizes), sum(sizes), sum(i * n for i, n in enumerate(sizes, 1))]],
                               dtype=torch.int64, device=self.buckets[0].buffer.device)
        rows = self.comm.all_gather(summary, dim=0).tolist()
        if any(row != rows[0] for row in rows):
            detail = "; ".join(f"DP rank {r}: {row[0]} buckets, {row[1]} elements" for r, row in enumerate(rows))
            raise ValueError(f"ShardedOptimizer: DP ranks disagree on the gradient buckets ({detail}); every DP "
                             "rank must pass the same parameters (shapes, order, dtype) and bucket_mb")

    # ------------------------------------------------------- the reducer's steps
    def start_step(self, num_microbatches: int = 1) -> None:
        """Expect ``num_microbatches`` backward passes; see :meth:`GradReducer.start_step`."""
        self._reduced = False
        self.reducer.start_step(num_microbatches)

    @torch.no_grad()
    def finish(self) -> None:
        """Reduce-scatter what is not yet reduced and wait: this rank's range of each bucket then
        holds the DP mean gradient, and the pieces' ``.grad`` are views of it."""
        self.reducer.finish()
        for bucket, mine in zip(self.buckets, self.pieces):
            lo, hi = shard_range(bucket, self.comm.rank, self.comm.size)
            reduced = self.reducer.reduced.pop(bucket.index)
            if reduced.data_ptr() != bucket.buffer[lo:hi].data_ptr():
                bucket.buffer[lo:hi].copy_(reduced)  # back into the bucket: no second gradient buffer lives on
            for piece in mine:
                piece.tensor.grad = bucket.buffer[piece.lo:piece.hi]
        self._reduced = True

    def zero_grad(self) -> None:
        """Zero the gradient buckets (the parameters' ``.grad`` views, the pieces' gradients)."""
        self.reducer.zero_grad()

    def started_before_backward_ended(self) -> Optional[bool]:
        """Whether the last step's first reduce-scatter started before its last gradient (None: no data)."""
        return self.reducer.started_before_backward_ended()

    # -------------------------------------------------------------- the update
    def _check_reduced(self, what: str) -> None:
        if not self._reduced:
            raise RuntimeError(f"ShardedOptimizer.{what}() needs reduced gradients: call start_step(), run "
                               f"backward, then finish() before {what}() (once per step)")

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, *, norm_comms: Sequence[Communicator] = (),
                        counted: Optional[Callable[[nn.Parameter], bool]] = None) -> torch.Tensor:
        """Scale the shard gradients so the global L2 norm is at most ``max_norm``; returns that norm.

        The norm is summed over DP shards and over ``norm_comms`` (model-parallel
        groups: TP, PP). A parameter replicated over one of them would count once
        per replica; ``counted(param)`` False leaves it out on this rank (e.g. TP
        rank > 0 for a replicated layer norm). Matches ``torch.nn.utils.clip_grad_norm_``
        on the whole model (scale ``max_norm / (norm + 1e-6)``, at most 1).
        """
        check_max_norm(max_norm)
        self._check_reduced("clip_grad_norm_")
        pairs = [(piece.tensor.grad, piece.param) for mine in self.pieces for piece in mine
                 if piece.param is not None]
        flat = self.flat_params[0]
        return clip_gradients(pairs, max_norm, (self.comm, *norm_comms), counted, flat.device, flat.dtype)

    @torch.no_grad()
    def step(self) -> None:
        """Update this rank's pieces, then all-gather every bucket back into the parameters.

        The all-gathers run one bucket ahead: bucket ``i + 1`` is in flight while
        bucket ``i`` is copied into place, so at most two gathered buckets exist.
        """
        self._check_reduced("step")
        self.optimizer.step()
        self._reduced = False
        in_flight = None
        for bucket, flat in zip(self.buckets, self.flat_params):
            lo, hi = shard_range(bucket, self.comm.rank, self.comm.size)
            handle = self.comm.all_gather(flat[lo:hi], dim=0, async_op=True)
            if in_flight is not None:
                _land(*in_flight)
            in_flight = (flat, handle)
        _land(*in_flight)

    # ---------------------------------------------------------------- state
    @property
    def state(self):
        """The wrapped optimizer's state, keyed by piece (this rank's slices of the buckets)."""
        return self.optimizer.state

    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's parameter groups (one), e.g. to change ``lr``."""
        return self.optimizer.param_groups

    def state_bytes(self) -> int:
        """Bytes of optimizer state tensors on this rank."""
        return optimizer_state_bytes(self.optimizer)

    def gather_state(self) -> dict[nn.Parameter, dict[str, Any]]:
        """Every parameter's whole optimizer state, as the unsharded torch optimizer would hold it.

        A DP collective: every DP rank calls it, and all get the same.
        """
        return gather_state(self.buckets, self.pieces, self.optimizer, self.comm, self._scalar_keys)

    def load_state(self, states: Mapping[nn.Parameter, Mapping[str, Any]]) -> None:
        """Load per-parameter optimizer state in the unsharded layout (from :meth:`gather_state`, a
        checkpoint, or a plain torch optimizer's ``state``), keeping this rank's share.

        A bucket's parameters must all have state or all have none; elementwise
        state must be shaped like its parameter; scalar state must agree within a
        bucket (it is kept once per bucket). Local: no communication.
        """
        load_state(states, self.buckets, self.pieces, self.optimizer, self._scalar_keys)

    def remove(self) -> None:
        """Detach the gradient hooks (parameters stay views into the flat buffers)."""
        self.reducer.remove()


def _land(flat: torch.Tensor, handle: Handle) -> None:
    full = handle.wait()
    if full.data_ptr() != flat.data_ptr():
        flat.copy_(full)


def _check_arguments(params: list, optimizer_class, comm, elementwise: Optional[bool]) -> None:
    if not isinstance(comm, Communicator):
        raise ValueError(f"ShardedOptimizer needs the DP Communicator (e.g. mesh.dp_comm), got {type(comm).__name__}")
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise ValueError("ShardedOptimizer takes the optimizer class (e.g. torch.optim.AdamW) and its "
                         f"arguments, not {optimizer_class!r}")
    if elementwise is None and not issubclass(optimizer_class, ELEMENTWISE):
        raise ValueError(f"ShardedOptimizer: {optimizer_class.__name__} is not known to update each element from "
                         "that element alone, which sharding a flat buffer needs; pass elementwise=True if it does "
                         f"(known: {', '.join(c.__name__ for c in ELEMENTWISE)})")
    if elementwise is False:
        raise ValueError(f"ShardedOptimizer: {optimizer_class.__name__} with elementwise=False cannot be sharded "
                         "(ZeRO-1 splits parameters at arbitrary element boundaries)")
    if any(isinstance(p, dict) for p in params):
        raise ValueError("ShardedOptimizer takes a list of parameters (one group), not parameter groups; "
                         "pass per-group hyperparameters as keyword arguments to one ShardedOptimizer per group")
    if not params:
        raise ValueError("ShardedOptimizer needs at least one parameter")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("ShardedOptimizer: a parameter appears twice; pass each (shared) parameter once")
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"ShardedOptimizer: parameters must be tensors, got {type(p).__name__}")
        if p.requires_grad and p.is_sparse:
            raise ValueError("ShardedOptimizer cannot shard sparse parameters")


def _scalar_state_keys(optimizer_class: type, kwargs: dict, like: torch.Tensor) -> frozenset[str]:
    """State entries the optimizer keeps per parameter rather than per element (Adam's ``step``),
    found by one step of a throwaway instance on a 2-element tensor."""
    probe = nn.Parameter(torch.zeros(2, dtype=like.dtype, device=like.device))
    probe.grad = torch.ones_like(probe)
    optimizer = optimizer_class([probe], **kwargs)
    optimizer.step()
    return frozenset(key for key, value in optimizer.state[probe].items()
                     if not (torch.is_tensor(value) and value.shape == probe.shape))
