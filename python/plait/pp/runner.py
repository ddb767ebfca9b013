"""One step of :class:`~plait.pp.engine.PipelineEngine` on one rank: run its action list.

Receives are posted where the lowered list puts them (early: when the data is, ideally,
sent) and waited on only by the compute that needs them, so transfers overlap compute.
Activations live from a stage's F until its B (or W) and are dropped then.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Sequence

import torch
from torch import nn

from .actions import Action, Kind
from .p2p import Meta, PendingRecv, Transport
from .schedule import Schedule
from .split_backward import WeightWork, backward_input, backward_weight
from .timeline import Recorder


class ActivationMemory:
    """Bytes of tensors saved for backward that are alive now and at most (parameters excluded).

    Counted by ``saved_tensors_hooks`` around each forward, released when autograd drops
    the tensor; views are counted at their own size.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self._param_storages = {p.untyped_storage().data_ptr() for p in params}
        self.live = 0
        self.peak = 0

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        if tensor.untyped_storage().data_ptr() in self._param_storages:
            return tensor
        return _Counted(tensor.detach(), self)  # detached: holding an output itself would be a cycle

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Counted) else packed


class _Counted:
    __slots__ = ("tensor", "nbytes", "owner")

    def __init__(self, tensor: torch.Tensor, owner: ActivationMemory) -> None:
        self.tensor, self.owner = tensor, owner
        self.nbytes = tensor.numel() * tensor.element_size()
        owner.live += self.nbytes
        owner.peak = max(owner.peak, owner.live)

    def __del__(self) -> None:
        self.owner.live -= self.nbytes


class StepRunner:
    """Executes ``program`` (this rank's lowered actions) once; see :meth:`run`."""

    def __init__(self, *, program: Sequence[Action], schedule: Schedule, rank: int, modules: dict[int, nn.Module],
                 params: dict[int, list], transport: Transport, training: bool, loss_fn: Optional[Callable],
                 inputs: Optional[list], targets: Optional[list], weights: Optional[list[float]],
                 metas: Optional[dict], recorder: Recorder, memory: Optional[ActivationMemory],
                 context: Optional[Callable[[int], ContextManager]] = None) -> None:
        self.program, self.schedule, self.rank = program, schedule, rank
        self.place, self.last = schedule.placement, schedule.num_stages - 1
        self.modules, self.params, self.transport = modules, params, transport
        self.training, self.loss_fn = training, loss_fn
        self.inputs, self.targets, self.weights = inputs, targets, weights
        self.known = metas  # None: a new signature, headers travel and new_metas fills
        self.new_metas: dict = {}
        self.recorder, self.memory = recorder, memory
        self.context = context or (lambda mb: contextlib.nullcontext())
        self.recvs: dict[Action, PendingRecv] = {}
        self.outbox: dict[Action, torch.Tensor] = {}
        self.local: dict[tuple, torch.Tensor] = {}  # hand-offs between stages on this rank
        self.acts: dict[tuple[int, int], tuple] = {}
        self.work: dict[tuple[int, int], WeightWork] = {}
        self.out_meta: dict[tuple[int, int], Meta] = {}
        self.loss_total: Optional[torch.Tensor] = None
        self.outputs: dict[int, torch.Tensor] = {}  # eval: the last stage's output by microbatch
        self.held = self.peak_held = 0

    # ------------------------------------------------------------------ driver
    def run(self) -> None:
        """Run every action; leaves the loss in ``loss_total`` and eval outputs in ``outputs`` (by microbatch)."""
        handlers = {Kind.RECV_F: self._recv_f, Kind.RECV_B: self._recv_b, Kind.SEND_F: self._send_f,
                    Kind.SEND_B: self._send_b, Kind.F: self._forward, Kind.B: self._backward,
                    Kind.I: self._backward, Kind.W: self._weight}
        for action in self.program:
            if action.kind.is_compute:
                handlers[action.kind](action)
                self.transport.prune()
            else:
                start = self.recorder.start()
                handlers[action.kind](action)
                self.recorder.stop(action, "post", start)
        self.transport.drain()
        left = list(self.acts) + list(self.work) + list(self.recvs) + list(self.outbox)
        if left:
            raise RuntimeError(f"pipeline rank {self.rank}: the step ended with unfinished work {left}; "
                               f"the schedule is inconsistent (this is a bug in plait)")

    # ---------------------------------------------------------------- transfers
    def _what(self, action: Action) -> str:
        peer = {Kind.RECV_F: -1, Kind.SEND_F: 1, Kind.RECV_B: 1, Kind.SEND_B: -1}[action.kind]
        direction = "from" if action.kind in (Kind.RECV_F, Kind.RECV_B) else "to"
        return (f"{action} ({'activation' if action.kind in (Kind.RECV_F, Kind.SEND_F) else 'gradient'} of "
                f"microbatch {action.microbatch} {direction} stage {action.stage + peer} on pipeline rank "
                f"{self.place[action.stage + peer]})")

    def _recv_f(self, action: Action) -> None:
        src = self.place[action.stage - 1]
        key = ("in", action.stage, action.microbatch)
        if self.known is None:
            meta = self.transport.recv_meta(src, self._what(action))
            self.new_metas[key] = meta
        else:
            meta = self.known[key]
        self.recvs[action] = self.transport.post_recv(meta, src, self._what(action))

    def _recv_b(self, action: Action) -> None:
        meta = self.out_meta[(action.stage, action.microbatch)]
        self.recvs[action] = self.transport.post_recv(meta, self.place[action.stage + 1], self._what(action))

    def _send_f(self, action: Action) -> None:
        tensor, dst = self.outbox.pop(action), self.place[action.stage + 1]
        meta, key = self.out_meta[(action.stage, action.microbatch)], ("out", action.stage, action.microbatch)
        if self.known is None:
            self.transport.send_meta(meta, dst, self._what(action))
            self.new_metas[key] = meta
        elif self.known[key] != meta:
            raise ValueError(f"stage {action.stage} returned {list(meta.shape)} {meta.dtype} for microbatch "
                             f"{action.microbatch}, but {list(self.known[key].shape)} {self.known[key].dtype} in an "
                             f"earlier step with the same input shapes; a stage's output shape and dtype must "
                             f"depend only on its input's")
        self.transport.send(tensor, dst, self._what(action))

    def _send_b(self, action: Action) -> None:
        self.transport.send(self.outbox.pop(action), self.place[action.stage - 1], self._what(action))

    def _take(self, action: Action) -> torch.Tensor:
        pending = self.recvs.pop(action)
        start = self.recorder.start()
        tensor = self.transport.wait_recv(pending)
        self.recorder.stop(action, "wait", start)
        return tensor

    # ------------------------------------------------------------------ compute
    def _forward(self, action: Action) -> None:
        s, mb = action.stage, action.microbatch
        if s == 0:
            x = self.inputs[mb]
        elif self.place[s - 1] == self.rank:
            x = self.local.pop(("F", s, mb))
        else:
            x = self._take(Action(s, Kind.RECV_F, mb))
        if self.training and s > 0 and x.is_floating_point():
            x.requires_grad_(True)
        start = self.recorder.start()
        with torch.set_grad_enabled(self.training), self.context(mb):
            if self.memory is not None and self.training:
                with self.memory.hooks():
                    y = self.modules[s](x)
            else:
                y = self.modules[s](x)
            if not isinstance(y, torch.Tensor):
                raise ValueError(f"stage {s} returned {type(y).__name__}; a pipeline stage must return one "
                                 f"tensor (concatenate or stack several outputs)")
            keep = self._finish_forward(s, mb, y)
        if self.training:
            self.acts[(s, mb)] = (x if s > 0 else None, keep)
            self.held += 1
            self.peak_held = max(self.peak_held, self.held)
        self.recorder.stop(action, "compute", start)

    def _finish_forward(self, s: int, mb: int, y: torch.Tensor) -> torch.Tensor:
        if s == self.last:
            if not self.training:
                self.outputs[mb] = y.detach()
            if self.loss_fn is None:
                return y
            loss = self.loss_fn(y, self.targets[mb])
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"loss_fn must return a scalar tensor, got "
                                 f"{list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
            scaled = loss.reshape(()) * self.weights[mb]
            value = scaled.detach().to(torch.float64)
            self.loss_total = value if self.loss_total is None else self.loss_total + value
            return scaled
        if self.training and not y.is_floating_point():
            raise ValueError(f"stage {s} returned a {y.dtype} tensor; between stages a training pipeline needs "
                             f"floating-point activations (they carry gradients back)")
        self.out_meta[(s, mb)] = Meta.of(y)
        if self.place[s + 1] == self.rank:
            self.local[("F", s + 1, mb)] = y.detach()
        else:
            self.outbox[Action(s, Kind.SEND_F, mb)] = y.detach()
        return y

    def _backward(self, action: Action) -> None:
        s, mb = action.stage, action.microbatch
        x, y = self.acts.pop((s, mb))
        if s == self.last:
            grad = None
        elif self.place[s + 1] == self.rank:
            grad = self.local.pop(("B", s, mb))
        else:
            grad = self._take(Action(s, Kind.RECV_B, mb))
        start = self.recorder.start()
        if action.kind == Kind.B:
            if y.requires_grad:
                torch.autograd.backward(y, grad)
            dx = None if x is None else (x.grad if x.grad is not None else torch.zeros_like(x))
            self.held -= 1
        else:
            dx, self.work[(s, mb)] = backward_input(y, grad, x, self.params[s])
        del y, grad
        if s > 0:
            if self.place[s - 1] == self.rank:
                self.local[("B", s - 1, mb)] = dx
            else:
                self.outbox[Action(s, Kind.SEND_B, mb)] = dx
        self.recorder.stop(action, "compute", start)

    def _weight(self, action: Action) -> None:
        start = self.recorder.start()
        backward_weight(self.work.pop((action.stage, action.microbatch)))
        self.held -= 1
        self.recorder.stop(action, "compute", start)
