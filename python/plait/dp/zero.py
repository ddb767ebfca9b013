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
microbatch's backward. Every bucket has a flat parameter buffer of the same
layout; the parameters become views into it, and this rank's slice of it,
``[rank * n/dp, (rank + 1) * n/dp)``, is the one tensor per bucket that the
wrapped torch optimizer sees. After the update each bucket's slices are
all-gathered back into the buffer, so every rank again holds all parameters.

Which optimizers. Sharding the flat buffer is exact only when the update of
an element depends on that element alone (its gradient, its state, scalars
such as the step count): SGD, Adam, AdamW, RMSprop... (:data:`ELEMENTWISE`).
LAMB/LARS-like per-tensor norms would be silently wrong, so any other class is
refused unless ``elementwise=True`` vouches for it.

Memory per rank, ``P`` parameters of ``b`` bytes, Adam: plain DP holds
``2 P b`` of state; ZeRO-1 holds ``2 (P + pad) b / dp`` (the padding is under
``dp`` elements per bucket). The parameters are not copied: the shard the
optimizer updates is a view of the flat parameter buffer.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..comm import Communicator, Handle
from .buckets import Bucket
from .clip import clip_scale, global_norm
from .grads import GradReducer

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

    ``optimizer_class(shards, **optimizer_kwargs)`` is built over one flat shard
    per gradient bucket. Also the DP gradient reducer of the step: call
    :meth:`start_step`, run backward, :meth:`finish`, then :meth:`step`; see
    the module doc. Every DP rank must pass the same parameter shapes in the
    same order (checked). Parameters that do not require grad are left alone.
    """

    def __init__(self, params: Iterable[nn.Parameter], optimizer_class: type, comm: Communicator, *,
                 bucket_mb: float = 25.0, overlap: bool = True, elementwise: Optional[bool] = None,
                 **optimizer_kwargs: Any) -> None:
        params = list(params)
        _check_arguments(params, optimizer_class, comm, elementwise)
        self.comm = comm
        self.reducer = _ShardReducer(params, comm, bucket_mb, overlap, pad_to=comm.size)
        self.buckets: list[Bucket] = self.reducer.buckets
        self._check_same_buckets_on_every_rank()
        self.flat_params: list[torch.Tensor] = []
        self.shards: list[nn.Parameter] = []
        for bucket in self.buckets:
            flat = self._flatten_params(bucket)
            size = flat.numel() // comm.size
            self.flat_params.append(flat)
            self.shards.append(nn.Parameter(flat[comm.rank * size:(comm.rank + 1) * size]))
        self.optimizer: torch.optim.Optimizer = optimizer_class(self.shards, **optimizer_kwargs)
        self._scalar_keys = _scalar_state_keys(optimizer_class, optimizer_kwargs, self.shards[0])

    # ------------------------------------------------------------------- set-up
    @staticmethod
    @torch.no_grad()
    def _flatten_params(bucket: Bucket) -> torch.Tensor:
        """A flat buffer laid out like the bucket's gradients; each parameter becomes a view into it."""
        flat = torch.zeros_like(bucket.buffer)
        for i, param in enumerate(bucket.params):
            view = flat[bucket.offsets[i]:bucket.offsets[i] + param.numel()].view_as(param)
            view.copy_(param.detach())
            param.data = view
        return flat

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
        self.reducer.start_step(num_microbatches)

    def finish(self) -> None:
        """Reduce-scatter what is not yet reduced and wait: this rank holds its shard's mean gradient."""
        self.reducer.finish()
        for bucket, shard in zip(self.buckets, self.shards):
            shard.grad = self.reducer.reduced[bucket.index]

    def zero_grad(self) -> None:
        """Zero the gradient buckets (the parameters' ``.grad`` views) and drop the shard gradients."""
        self.reducer.zero_grad()
        for shard in self.shards:
            shard.grad = None

    def started_before_backward_ended(self) -> Optional[bool]:
        """Whether the last step's first reduce-scatter started before its last gradient (None: no data)."""
        return self.reducer.started_before_backward_ended()

    # -------------------------------------------------------------- the update
    def _check_reduced(self, what: str) -> None:
        if any(shard.grad is None for shard in self.shards):
            raise RuntimeError(f"ShardedOptimizer.{what}() needs reduced gradients: call start_step(), run "
                               f"backward, then finish() before {what}()")

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
        if not max_norm > 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}")
        self._check_reduced("clip_grad_norm_")
        squares = torch.zeros((), dtype=torch.float64, device=self.shards[0].device)
        for bucket, shard in zip(self.buckets, self.shards):
            grad = shard.grad.double()
            if counted is None:
                squares += grad.square().sum()
                continue
            start = self.comm.rank * shard.numel()
            for i, param in enumerate(bucket.params):
                lo = max(bucket.offsets[i], start) - start
                hi = min(bucket.offsets[i] + param.numel(), start + shard.numel()) - start
                if lo < hi and counted(param):
                    squares += grad[lo:hi].square().sum()
        norm = global_norm(squares, (self.comm, *norm_comms))
        scale = clip_scale(norm, max_norm)
        for shard in self.shards:
            shard.grad.mul_(scale.to(shard.grad.dtype))
        return norm.to(self.shards[0].dtype)

    @torch.no_grad()
    def step(self) -> None:
        """Update this rank's shard of every bucket, then all-gather the buckets into the parameters."""
        self._check_reduced("step")
        self.optimizer.step()
        handles = [self.comm.all_gather(shard.detach(), dim=0, async_op=True) for shard in self.shards]
        for flat, handle in zip(self.flat_params, handles):
            full = handle.wait()
            if full.data_ptr() != flat.data_ptr():
                flat.copy_(full)
        for shard in self.shards:
            shard.grad = None

    # ---------------------------------------------------------------- state
    @property
    def state(self):
        """The wrapped optimizer's state, keyed by shard (one per bucket)."""
        return self.optimizer.state

    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's parameter groups (one), e.g. to change ``lr``."""
        return self.optimizer.param_groups

    def state_bytes(self) -> int:
        """Bytes of optimizer state tensors on this rank."""
        return optimizer_state_bytes(self.optimizer)

    @torch.no_grad()
    def gather_state(self) -> dict[nn.Parameter, dict[str, Any]]:
        """Every parameter's full optimizer state, as the unsharded torch optimizer would hold it.

        A DP collective (every DP rank calls it, gets the same). Elementwise state
        (moments) is all-gathered and cut per parameter; scalar state (the step
        count) is shared by the bucket and copied to each of its parameters.
        """
        out: dict[nn.Parameter, dict[str, Any]] = {}
        for bucket, shard in zip(self.buckets, self.shards):
            state = self.optimizer.state.get(shard, {})
            if not state:
                continue
            gathered = {key: self.comm.all_gather(state[key].contiguous(), dim=0)
                        for key in sorted(state) if key not in self._scalar_keys}
            for i, param in enumerate(bucket.params):
                lo, hi = bucket.offsets[i], bucket.offsets[i] + param.numel()
                out[param] = {key: (gathered[key][lo:hi].view_as(param).clone() if key in gathered
                                    else _copy(value)) for key, value in state.items()}
        return out

    @torch.no_grad()
    def load_state(self, states: Mapping[nn.Parameter, Mapping[str, Any]]) -> None:
        """Load per-parameter optimizer state in the unsharded layout (from :meth:`gather_state`, a
        checkpoint, or a plain torch optimizer's ``state``), keeping this rank's shard.

        A bucket's parameters must all have state or all have none; elementwise
        state must be shaped like its parameter; scalar state must agree within a
        bucket (it is kept once per bucket).
        """
        for bucket, shard in zip(self.buckets, self.shards):
            have = [bool(states.get(param)) for param in bucket.params]
            if not any(have):
                self.optimizer.state.pop(shard, None)
                continue
            if not all(have):
                raise ValueError(f"load_state: {have.count(False)} of the {len(have)} parameters of bucket "
                                 f"{bucket.index} have no optimizer state; give state for all or none of them")
            start, size = self.comm.rank * shard.numel(), shard.numel()
            loaded = {}
            for key, value in states[bucket.params[0]].items():
                if key in self._scalar_keys:
                    for param in bucket.params[1:]:
                        if not _same(states[param].get(key), value):
                            raise ValueError(f"load_state: state {key!r} differs between parameters of one bucket "
                                             f"({_describe(value)} vs {_describe(states[param].get(key))}); "
                                             "ZeRO-1 keeps one value per bucket")
                    loaded[key] = _copy(value)
                    continue
                flat = torch.zeros(bucket.buffer.numel(), dtype=value.dtype, device=shard.device)
                for i, param in enumerate(bucket.params):
                    part = states[param].get(key)
                    if not torch.is_tensor(part) or part.shape != param.shape:
                        raise ValueError(f"load_state: state {key!r} of a parameter of shape {list(param.shape)} "
                                         f"is {_describe(part)}; elementwise state must have its parameter's shape")
                    flat[bucket.offsets[i]:bucket.offsets[i] + param.numel()] = part.reshape(-1)
                loaded[key] = flat[start:start + size].clone()
            self.optimizer.state[shard] = loaded

    def remove(self) -> None:
        """Detach the gradient hooks (parameters stay views into the flat buffers)."""
        self.reducer.remove()


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


def _copy(value: Any) -> Any:
    return value.clone() if torch.is_tensor(value) else value


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return a == b


def _describe(value: Any) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {list(value.shape)}" if value.dim() else f"{value.item()!r}"
    return repr(value)
