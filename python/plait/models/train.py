"""A minimal training loop: the reference GPT on a DP x PP x TP mesh, on synthetic tokens from a seed.

Real training is :mod:`plait.train` (``plait train --gpt ...``: token files, schedules,
checkpoints, resume). This loop stays as the small, dependency-free harness that
``bench/train.py`` (``plait bench train``) and tests/test_3d.py, tests/test_zero.py drive:
:class:`TrainJob` holds and checks every setting before anything starts; :func:`train` runs
it on this process's rank (all ranks call it) and returns per-step records.

Synthetic data: each sequence counts upward from a random start with a random
stride (mod vocab) and 10% noise tokens, so a model can learn it and the loss
falls; the batch of step ``s`` depends only on (seed, s), and DP rank ``d``
takes rows ``[d*B/dp, (d+1)*B/dp)`` of it, so every layout sees the same data.

Optimizer: AdamW. ``zero=1`` shards its state over DP (ZeRO-1,
:class:`plait.dp.ShardedOptimizer`): same results, ``1/dp`` of the state per
rank. ``clip_grad`` > 0 clips gradients to that global L2 norm (over DP, PP and
TP, replicated parameters counted once), as one process would.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..config import ParallelConfig
from .config import GPTConfig


@dataclass
class TrainJob:
    """One training run. ``global_batch`` sequences per step, split over DP, then microbatches."""

    model: GPTConfig
    dp: int = 1
    pp: int = 1
    tp: int = 1
    num_virtual: int = 1
    schedule: str = "1f1b"
    microbatches: int = 1
    global_batch: int = 8
    steps: int = 3
    seed: int = 0
    lr: float = 1e-3
    bucket_mb: float = 25.0
    dp_overlap: bool = True
    zero: int = 0
    clip_grad: float = 0.0

    def __post_init__(self) -> None:
        for name in ("microbatches", "global_batch", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(self.clip_grad, (int, float)) and self.clip_grad >= 0):
            raise ValueError(f"clip_grad must be a number >= 0 (0: no clipping), got {self.clip_grad!r}")
        # the layout rules (sizes, schedule, virtual stages, ZeRO) have one owner
        self.parallel = ParallelConfig(dp=self.dp, pp=self.pp, tp=self.tp, num_virtual=self.num_virtual,
                                       schedule=self.schedule, sequence_parallel=self.model.sequence_parallel,
                                       zero=self.zero)
        if not (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.bucket_mb, (int, float)) and not isinstance(self.bucket_mb, bool)
                and self.bucket_mb > 0):
            raise ValueError(f"bucket_mb must be a positive number of MB (gradient bucket size), got "
                             f"{self.bucket_mb!r}")
        per_replica = self.dp * self.microbatches
        if self.global_batch % per_replica:
            raise ValueError(f"global batch {self.global_batch} is not divisible by dp x microbatches = "
                             f"{self.dp} x {self.microbatches}; use a multiple of {per_replica}")
        self.model.check_layout(self.tp, self.pp, self.num_virtual)

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.model.seq_len


def synthetic_batch(job: TrainJob, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole global batch of ``step``: token ids and next-token targets, ``[global_batch, seq]`` each."""
    vocab, seq = job.model.vocab_size, job.model.seq_len
    gen = torch.Generator().manual_seed(job.seed * 100_003 + step)
    start = torch.randint(0, vocab, (job.global_batch, 1), generator=gen)
    stride = torch.randint(1, 4, (job.global_batch, 1), generator=gen)
    tokens = (start + stride * torch.arange(seq + 1)) % vocab
    noise = torch.rand(job.global_batch, seq + 1, generator=gen) < 0.1
    tokens = torch.where(noise, torch.randint(0, vocab, tokens.shape, generator=gen), tokens)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


@dataclass
class StepRecord:
    step: int
    loss: float
    tokens_per_s: float
    seconds: float
    extra: dict = field(default_factory=dict)


def train(job: TrainJob, on_step: Optional[Callable[[StepRecord], None]] = None, *, mesh=None,
          return_state: bool = False):
    """Run ``job`` on this rank (every rank calls it). Returns the step records, and with
    ``return_state`` also this rank's chunks' full (TP-gathered) parameters by name."""
    import plait
    from ..dp import GradReducer, ShardedOptimizer, clip_grad_norm_, optimizer_state_bytes
    from ..pp import PipelineEngine
    from .gpt import build_stages, full_state_dict, gpt_loss

    mesh = mesh or plait.init_mesh(dp=job.dp, pp=job.pp, tp=job.tp)
    stages = build_stages(job.model, mesh.tp_comm, job.pp, mesh.pp_rank, job.num_virtual, job.seed)
    params = [p for stage in stages for p in stage.parameters()]
    # ZeRO-1 is the optimizer and the DP reducer at once; it re-points the parameters into flat
    # buffers, so it comes before the engine, which notes where the parameters live.
    if job.zero:
        reducer = optimizer = ShardedOptimizer(params, torch.optim.AdamW, mesh.dp_comm, bucket_mb=job.bucket_mb,
                                               overlap=job.dp_overlap, lr=job.lr)
    else:
        reducer = GradReducer(params, mesh.dp_comm, job.bucket_mb, overlap=job.dp_overlap) if job.dp > 1 else None
        optimizer = torch.optim.AdamW(params, lr=job.lr)
    engine = PipelineEngine(stages, mesh, job.schedule, job.microbatches,
                            loss_fn=lambda logits, targets: gpt_loss(logits, targets, mesh.tp_comm),
                            num_virtual=job.num_virtual)
    model_comms = [c for c in (mesh.pp_comm, mesh.tp_comm) if c.size > 1]
    once = lambda p: mesh.tp_rank == 0 or getattr(p, "tp_split_dim", None) is not None  # TP replicas count once
    rows = job.global_batch // job.dp
    records = []
    for step in range(job.steps):
        ids, targets = synthetic_batch(job, step)
        ids, targets = (t[mesh.dp_rank * rows:(mesh.dp_rank + 1) * rows] for t in (ids, targets))
        start = time.perf_counter()
        if reducer is not None:
            reducer.start_step(job.microbatches)
        loss = engine.train_step(ids, targets)
        if reducer is not None:
            reducer.finish()
        grad_norm = None
        if job.clip_grad and job.zero:
            grad_norm = optimizer.clip_grad_norm_(job.clip_grad, norm_comms=model_comms, counted=once)
        elif job.clip_grad:
            grad_norm = clip_grad_norm_(params, job.clip_grad, model_comms, counted=once)
        optimizer.step()
        if reducer is not None:
            reducer.zero_grad()
        else:
            optimizer.zero_grad(set_to_none=False)
        loss = mesh.dp_comm.all_reduce(loss.detach().clone(), op="avg")
        seconds = time.perf_counter() - start
        record = StepRecord(step, float(loss), job.tokens_per_step / seconds, seconds)
        if job.dp > 1:
            record.extra["dp_overlapped"] = reducer.started_before_backward_ended()
        record.extra["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
        if grad_norm is not None:
            record.extra["grad_norm"] = float(grad_norm)
        records.append(record)
        if on_step is not None:
            on_step(record)
    if return_state:
        return records, full_state_dict(stages)
    return records
