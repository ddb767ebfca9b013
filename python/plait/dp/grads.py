"""Data-parallel gradient reduction in buckets, overlapped with backward.

Use::

    reducer = GradReducer(model.parameters(), mesh.dp_comm, bucket_mb=25)
    for step in ...:
        reducer.start_step(num_microbatches)
        for mb in microbatches: loss(mb).backward()     # or a PipelineEngine step
        reducer.finish()                                # waits; grads are DP means
        optimizer.step(); reducer.zero_grad()

Each parameter's gradient is counted as backward accumulates it; when it has
received its last microbatch's contribution, it is ready, and a bucket whose
parameters are all ready starts its all-reduce (mean over DP) at once, while
backward goes on producing earlier layers' gradients. Earlier microbatches
therefore trigger no communication, and no engine needs to tell the reducer
which backward is the last. Parameters that received fewer gradients than
expected (unused in the step) are reduced by :meth:`finish`.

What a bucket's reduction is lives in :meth:`GradReducer._reduce` (here: an
all-reduce of the whole buffer); ZeRO-1 (:mod:`plait.dp.zero`) overrides it
with a reduce-scatter and keeps the rest: the counting, the launch points, the
bounded waits.
"""
from __future__ import annotations

import time
from typing import Iterable, Optional

import torch

from ..comm import Communicator, Handle
from .buckets import Bucket, build_buckets


class GradReducer:
    """Bucketed, overlapped mean of gradients over a data-parallel communicator.

    ``timeline`` records ``(seconds, event, bucket)`` for every bucket launch and
    the time of the last gradient hook, so tests and benchmarks can prove the
    reduction started before backward ended.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], comm: Communicator, bucket_mb: float = 25.0,
                 overlap: bool = True, *, pad_to: int = 1) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("GradReducer needs at least one parameter that requires grad")
        self.comm = comm
        self.overlap = overlap
        self.buckets: list[Bucket] = build_buckets(self.params, int(bucket_mb * 2**20), pad_to)
        self._where = {}
        for bucket in self.buckets:
            for i, param in enumerate(bucket.params):
                self._where[id(param)] = (bucket.index, i)
        self._expected = 0
        self._counts: dict[int, int] = {}
        self._pending: list[int] = [0] * len(self.buckets)
        self._handles: dict[int, Handle] = {}
        self.reduced: dict[int, torch.Tensor] = {}  # bucket index -> what its reduction returned
        self.timeline: list[tuple[float, str, int]] = []
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    # ----------------------------------------------------------------- steps
    def start_step(self, num_microbatches: int = 1) -> None:
        """Expect ``num_microbatches`` gradient contributions per parameter in this step."""
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be at least 1, got {num_microbatches}")
        if self._handles:
            raise RuntimeError("start_step called while reductions of the previous step are pending; "
                               "call finish() first")
        for bucket in self.buckets:
            bucket.attach()
        self._expected = num_microbatches
        self._counts = {id(p): 0 for p in self.params}
        self._pending = [len(b.params) for b in self.buckets]
        self.reduced = {}
        self.timeline = []

    def _on_grad(self, param: torch.nn.Parameter) -> None:
        if not self._expected:
            return  # outside start_step/finish: plain accumulation, no reduction
        key = id(param)
        self._counts[key] += 1
        self.timeline.append((time.perf_counter(), "grad", self._where[key][0]))
        if self._counts[key] == self._expected:
            index = self._where[key][0]
            self._pending[index] -= 1
            if self._pending[index] == 0 and self.overlap:
                self._launch(index)

    def _launch(self, index: int) -> None:
        self.timeline.append((time.perf_counter(), "launch", index))
        self._handles[index] = self._reduce(self.buckets[index])

    def _reduce(self, bucket: Bucket) -> Handle:
        """Start the DP mean of one bucket: an all-reduce, in place (the ``.grad`` views see it)."""
        return self.comm.all_reduce(bucket.buffer, op="avg", async_op=True)

    def finish(self) -> None:
        """Reduce what is still unreduced, wait for every bucket (bounded), end the step."""
        if not self._expected:
            raise RuntimeError("finish() without start_step()")
        for bucket in self.buckets:
            if bucket.index not in self._handles:
                self._launch(bucket.index)
        for index in sorted(self._handles):
            self.reduced[index] = self._handles[index].wait()
        self._handles.clear()
        self._expected = 0

    def zero_grad(self) -> None:
        """Zero every gradient in place (keeps the bucket views; prefer it to optimizer.zero_grad)."""
        for bucket in self.buckets:
            bucket.buffer.zero_()

    def started_before_backward_ended(self) -> Optional[bool]:
        """Whether the first launch of the last step came before its last gradient (None: no data)."""
        launches = [t for t, kind, _ in self.timeline if kind == "launch"]
        grads = [t for t, kind, _ in self.timeline if kind == "grad"]
        if not launches or not grads:
            return None
        return min(launches) < max(grads)

    def remove(self) -> None:
        """Detach the hooks (the gradients stay views into the buckets)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
