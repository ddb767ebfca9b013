"""AdamW with decay groups, the learning-rate schedule, DP reduction and global gradient clipping.

:class:`Optimizer` is what one step of a job calls, in order::

    opt.start_step(microbatches); engine.train_step(...); opt.finish(model)   # DP mean + tied grads
    norm = opt.clip(max_norm); opt.step(); opt.zero_grad()

- Parameter groups: weight decay on matrices only, never on biases and norms (1-D
  parameters). With ``weight_decay == 0`` there is one group, so the update is exactly
  ``torch.optim.AdamW(params, lr, betas, eps, weight_decay=0)``.
- DP: a :class:`~plait.dp.GradReducer` beside ``torch.optim.AdamW`` (zero=0), or one
  :class:`~plait.dp.ShardedOptimizer` (ZeRO-1) per group.
- The schedule (:func:`lr_factor`) runs through ``torch.optim.lr_scheduler.LambdaLR``.
- The gradient norm is the one-process norm of the whole model: squares summed over
  DP shards (ZeRO), TP and PP, a parameter replicated over TP counted on TP rank 0, KV-head
  rows replicated over TP counted on the lowest rank holding them, a head tied to an
  embedding on another pipeline rank counted once.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..dp import GradReducer, ShardedOptimizer, optimizer_state_bytes
from ..dp.clip import clip_scale, global_norm


def lr_factor(step: int, *, steps: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """The multiplier of the peak lr at 0-based ``step``: linear warmup over ``warmup`` steps (the
    first step at ``1/warmup``), then ``schedule`` from 1 down towards ``min_ratio``, which it
    reaches after the last step (so the last step still learns when ``min_ratio`` is 0)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Optimizer:
    """AdamW over a :class:`~plait.ParallelModel`'s parameters; see the module doc."""

    def __init__(self, model, job, start_step: int = 0) -> None:
        self.model, self.mesh = model, model.mesh
        named = [(n, p) for n, p in model.named_model_parameters() if p.requires_grad]
        self.names = {id(p): n for n, p in named}
        decay = [p for _, p in named if p.dim() >= 2]
        flat = [p for _, p in named if p.dim() < 2]
        groups = [(decay, job.weight_decay), (flat, 0.0)] if job.weight_decay else [([p for _, p in named], 0.0)]
        groups = [(params, wd) for params, wd in groups if params]
        kwargs = dict(lr=job.lr, betas=(job.beta1, job.beta2), eps=job.eps)
        # Tied embeddings across pipeline ranks: the PP sum of their gradients must come before
        # the DP reduction (ZeRO-1 reduces only this rank's shard), so the reducer waits for finish().
        overlap = job.dp_overlap and not (model.tied and self.mesh.pp > 1)
        if job.zero:
            self.sharded = [ShardedOptimizer(params, torch.optim.AdamW, self.mesh.dp_comm, bucket_mb=job.bucket_mb,
                                             overlap=overlap, weight_decay=wd, **kwargs) for params, wd in groups]
            self.torch_optimizers = [s.optimizer for s in self.sharded]
            self.reducers = self.sharded
        else:
            self.sharded = []
            self.torch_optimizers = [torch.optim.AdamW([{"params": params, "weight_decay": wd}
                                                        for params, wd in groups], **kwargs)]
            params = [p for params, _ in groups for p in params]
            self.reducers = ([GradReducer(params, self.mesh.dp_comm, job.bucket_mb, overlap=overlap)]
                             if self.mesh.dp > 1 else [])
        self.params = [p for _, p in named]
        factor = lambda s: lr_factor(s + start_step, steps=job.steps, warmup=job.warmup,  # noqa: E731
                                     schedule=job.lr_schedule, min_ratio=job.min_lr / job.lr)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in self.torch_optimizers]
        self._counted = {id(p): self._counted_in_norm(n, p) for n, p in named}

    def _counted_in_norm(self, name: str, param: nn.Parameter) -> Union[bool, torch.Tensor]:
        """True: every element of this rank's ``param`` counts in the global norm; False: none (another
        rank counts it); a flat 0/1 mask: the elements of rows that no lower TP rank (and no earlier
        row here) holds too, for KV heads replicated over TP."""
        if self.model.tied and self.mesh.pp > 1 and name == self.model.plan.head + ".weight":
            return False   # the embedding on the first pipeline rank is the same parameter
        spec = self.model.spec_of(name)
        if spec.dim is None:
            return self.mesh.tp_rank == 0
        if not spec.replicated:
            return True
        seen = {i for r in range(self.mesh.tp_rank) for i in self.model.spec_of(name, r).index}
        keep = []
        for i in spec.index:
            keep.append(i not in seen)
            seen.add(i)
        dim = (1 - spec.dim) if spec.transpose else spec.dim
        shape = [1] * param.dim()
        shape[dim] = len(keep)
        mask = torch.tensor(keep, dtype=torch.float64, device=param.device).view(shape)
        return mask.expand(param.shape).reshape(-1)

    @property
    def lr(self) -> float:
        return self.torch_optimizers[0].param_groups[0]["lr"]

    # ----------------------------------------------------------------- a step
    def start_step(self, num_microbatches: int) -> None:
        for reducer in self.reducers:
            reducer.start_step(num_microbatches)

    def finish(self) -> None:
        """After backward: tied gradients summed over PP, then the DP mean (bounded waits)."""
        self.model.finish_grads()
        for reducer in self.reducers:
            reducer.finish()

    def _pieces(self) -> list[tuple[torch.Tensor, nn.Parameter, int]]:
        """(gradient, its parameter, the gradient's first element within the flat parameter) on this rank."""
        if not self.sharded:
            return [(p.grad, p, 0) for p in self.params if p.grad is not None]
        out = []
        for s in self.sharded:
            for bucket, mine in zip(s.buckets, s.pieces):
                starts = {id(p): offset for p, offset in zip(bucket.params, bucket.offsets)}
                out += [(piece.tensor.grad, piece.param, piece.lo - starts[id(piece.param)]) for piece in mine
                        if piece.param is not None]
        return out

    @torch.no_grad()
    def clip(self, max_norm: float) -> torch.Tensor:
        """The global gradient L2 norm (float64); with ``max_norm > 0`` gradients are scaled to at most it."""
        pieces = self._pieces()
        squares = torch.zeros((), dtype=torch.float64, device=self.mesh.device)
        for grad, param, start in pieces:
            counted = self._counted[id(param)]
            if counted is True:
                squares += grad.double().square().sum()
            elif counted is not False:
                squares += (grad.double().reshape(-1).square() * counted[start:start + grad.numel()]).sum()
        comms = [c for c in ((self.mesh.dp_comm,) if self.sharded else ()) + (self.mesh.tp_comm, self.mesh.pp_comm)
                 if c.size > 1]
        norm = global_norm(squares, comms)
        if max_norm > 0:
            scale = clip_scale(norm, max_norm)
            for grad, _, _ in pieces:
                grad.mul_(scale.to(grad.dtype))
        return norm

    def dp_overlapped(self) -> Optional[bool]:
        """Whether the last step's DP gradient reduction started before its backward ended (None: no DP
        reduction on this rank)."""
        flags = [f for f in (r.started_before_backward_ended() for r in self.reducers) if f is not None]
        return any(flags) if flags else None

    def step(self) -> None:
        for optimizer in self.sharded or self.torch_optimizers:
            optimizer.step()
        for scheduler in self.schedulers:
            scheduler.step()

    def zero_grad(self) -> None:
        if self.reducers:
            for reducer in self.reducers:
                reducer.zero_grad()
        else:
            for optimizer in self.torch_optimizers:
                optimizer.zero_grad(set_to_none=False)

    # ----------------------------------------------------------------- state
    def state_bytes(self) -> int:
        """Bytes of optimizer state tensors on this rank (its DP shard of them with ZeRO-1)."""
        return sum(optimizer_state_bytes(o) for o in self.torch_optimizers)

    def param_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """This rank's optimizer state by parameter name, each tensor whole over DP (a DP collective
        with ZeRO-1) and shaped like this rank's parameter (its TP shard)."""
        if self.sharded:
            states = {}
            for s in self.sharded:
                states.update(s.gather_state())
        else:
            states = self.torch_optimizers[0].state
        return {self.names[id(p)]: dict(states[p]) for p in self.params if p in states and states[p]}

    def load_param_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Set the state of this rank's parameters from per-name states shaped like them (local)."""
        by_param = {p: states[self.names[id(p)]] for p in self.params if self.names[id(p)] in states}
        if self.sharded:
            for s in self.sharded:
                s.load_state({p: by_param[p] for bucket in s.buckets for p in bucket.params if p in by_param})
        else:
            for param, state in by_param.items():
                self.torch_optimizers[0].state[param] = state

