"""One rank of a training job: check everything, build the model, train, evaluate, save.

:func:`train_rank` is what every rank runs (under ``torchrun`` or :func:`plait.launch.run_ranks`).
Before any communication every rank checks the job, the data files, the checkpoint to
resume from and the save directory, so a bad input ends the job with the same clear
error on every rank. A step is::

    ids, targets = batches.batch(step, dp_rank)          # this DP rank's rows of the global batch
    loss = engine.train_step(ids, targets)                 # microbatches through the pipeline
    optimizer.finish(); norm = optimizer.clip(...); optimizer.step(); optimizer.zero_grad()

A non-finite loss or gradient norm stops the job naming the step (every rank sees the same
values, so every rank stops).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Optional

import torch

from .checkpoint import (check_checkpoint, check_writable, load_optimizer_state, resolve_resume, restore_rng,
                         save_checkpoint, step_dirs)
from .data import Batches, job_batches
from .job import TrainJob
from .model import build_model, check_same_model, describe, model_config, parameter_shapes
from .optim import Optimizer
from .recompute import apply_recompute
from .tensorboard import TensorBoardLog, check_available as check_tensorboard


@dataclass
class StepRecord:
    """What one step reports (the ``--json`` line)."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    seconds: float
    eval_loss: Optional[float] = None
    dp_overlapped: Optional[bool] = None   # the DP gradient reduction started before backward ended (dp > 1)


@dataclass
class Summary:
    """The job's outcome: its step records and where it saved."""

    records: list[StepRecord] = field(default_factory=list)
    start_step: int = 0
    checkpoint: Optional[str] = None
    eval_loss: Optional[float] = None
    seconds: float = 0.0
    optimizer_state_bytes: int = 0   # this rank's optimizer state after the last step (its DP shard with ZeRO-1)


class NonFiniteError(ValueError):
    """The loss or the gradient norm of a step is inf or NaN."""


# --------------------------------------------------------------------------- the job
def _fingerprint(job: TrainJob) -> dict:
    fp = job.fingerprint()
    if job.data is not None:
        fp["data"] = Path(job.data).name
        fp["data_bytes"] = Path(job.data).stat().st_size
    return fp


def train_rank(job: TrainJob, on_step: Optional[Callable[[StepRecord], None]] = None, *,
               show: Optional[bool] = None,
               around_step: Callable[[], ContextManager] = contextlib.nullcontext) -> Summary:
    """Run ``job`` on this rank (every rank calls it); see the module doc. ``show``: print progress and
    the summary (default: on global rank 0). ``around_step()`` is entered around each step's forward
    and backward (``engine.train_step``) only, e.g. a benchmark's activation-memory probe.

    torch.distributed is started (and shut down at the end) from the torchrun environment
    unless the caller already started it; then the job only adds its mesh's groups to it, so
    several jobs can run one after another in the same processes.
    """
    import plait

    started = time.perf_counter()
    config = model_config(job)
    batches, evaluation = job_batches(job, config.vocab_size)
    checkpoint = resolve_resume(job.resume, job.save)
    resume_state = None
    if checkpoint is not None:
        shapes, tied = parameter_shapes(config)
        resume_state = check_checkpoint(checkpoint, shapes, _fingerprint(job), tied)
        check_same_model(checkpoint, resume_state.get("model"), config)
        if resume_state["step"] >= job.steps:
            raise ValueError(f"{checkpoint}: already at step {resume_state['step']}, and the job has "
                             f"steps={job.steps}; ask for more steps to continue")
    if job.save:
        check_writable(job.save)
    if job.tensorboard:
        check_tensorboard()
        check_writable(job.tensorboard)

    owns = not torch.distributed.is_initialized()   # else the caller's process group outlives the job
    # The axes' collectives: plait's shared-memory backend for CPU ranks (gloo is 10-100x slower for the
    # small messages of tensor parallelism); NCCL on CUDA unless the job asks otherwise.
    comm = job.comm or ("torch" if torch.cuda.is_available() else "auto")
    mesh = plait.init_mesh(job.parallel, comm=comm)
    try:
        summary = _train(job, mesh, config, batches, evaluation, checkpoint, resume_state, on_step,
                         show if show is not None else mesh.rank == 0, started, around_step)
    except Exception as exc:
        # A vanished host shows up as a timeout or a closed connection: name the host instead.
        lost = None if isinstance(exc, ValueError) else mesh.host_lost(exc, _RESUME_HINT if job.save else "")
        _end_mesh(mesh, owns, clean=False)
        if lost is not None:
            raise lost from exc
        raise
    except BaseException:
        _end_mesh(mesh, owns, clean=False)
        raise
    _end_mesh(mesh, owns, clean=True)
    return summary


_RESUME_HINT = "; the job stopped: continue it on the remaining hosts with --resume latest (any layout)"


def _end_mesh(mesh, owns: bool, clean: bool) -> None:
    """Shut the job's mesh down if this job started torch.distributed, else only stop its host watch."""
    import plait

    if owns:
        plait.destroy_mesh(barrier=clean)
    elif mesh.watch is not None:
        mesh.watch.close(None if clean else "stopped after an error")


def _train(job, mesh, config, batches, evaluation, checkpoint, resume_state, on_step, show, started,
           around_step) -> Summary:
    model = build_model(job, config, mesh, checkpoint)
    apply_recompute(model, job.recompute)
    start = resume_state["step"] if resume_state else 0
    optimizer = Optimizer(model, job, start_step=start)
    if resume_state:
        load_optimizer_state(checkpoint, resume_state, model, optimizer)
        restore_rng(resume_state)
    model.train()                     # dropout on (eval_step and evaluation switch it off for themselves)
    model.dropout_seed = job.seed     # layout-invariant dropout: masks keyed by (seed, step, site, element)
    engine = model.pipeline(job.schedule, num_microbatches=job.microbatches)
    engine.train_steps = start
    autocast = (lambda: torch.autocast(mesh.device.type, dtype=torch.bfloat16)) if job.mixed == "bf16" \
        else contextlib.nullcontext
    summary = Summary(start_step=start)
    bar = _progress(job, start) if show and not job.json else None
    board = TensorBoardLog(job.tensorboard) if job.tensorboard and mesh.rank == 0 else None
    tokens = job.global_batch * job.seq
    for step in range(start, job.steps):
        t0 = time.perf_counter()
        ids, targets = batches.batch(step, mesh.dp_rank)
        optimizer.start_step(job.microbatches)
        with around_step(), autocast():
            loss = engine.train_step(ids, targets)
        optimizer.finish()
        loss = mesh.dp_comm.all_reduce(loss.detach().double().clone(), op="avg")
        norm = optimizer.clip(job.clip_grad)
        if not (math.isfinite(float(loss)) and math.isfinite(float(norm))):
            raise NonFiniteError(f"step {step + 1}: the loss is {float(loss)} and the gradient norm {float(norm)}; "
                                 f"training stopped (lower --lr, use --clip-grad, or check the data)")
        lr = optimizer.lr
        optimizer.step()
        optimizer.zero_grad()
        seconds = time.perf_counter() - t0
        record = StepRecord(step + 1, float(loss), lr, float(norm), tokens / seconds, seconds)
        record.dp_overlapped = optimizer.dp_overlapped()
        last = step + 1 == job.steps
        if evaluation is not None and ((job.eval_every and (step + 1) % job.eval_every == 0) or last):
            with autocast():
                record.eval_loss = _evaluate(engine, evaluation, job.eval_batches, mesh)
            summary.eval_loss = record.eval_loss
        summary.records.append(record)
        if show:
            _report(job, record, bar)
        if board is not None:
            board.log(record)
        if on_step is not None:
            on_step(record)
        if job.save and ((job.save_every and (step + 1) % job.save_every == 0) or last):
            summary.checkpoint = str(save_checkpoint(job.save, step + 1, model, optimizer,
                                                     {"fingerprint": _fingerprint(job), "lr": lr,
                                                      "model": describe(config)}, job.keep))
    if bar is not None:
        bar.close()
    if board is not None:
        board.close()
    summary.optimizer_state_bytes = optimizer.state_bytes()
    summary.seconds = time.perf_counter() - started
    if show:
        _print_summary(job, summary)
    return summary


@torch.no_grad()
def _evaluate(engine, evaluation: Batches, num_batches: int, mesh) -> float:
    total = torch.zeros((), dtype=torch.float64)
    for i in range(num_batches):
        ids, targets = evaluation.batch(i, mesh.dp_rank)
        total += engine.eval_step(ids, targets).double().cpu()
    total = mesh.dp_comm.all_reduce(total.to(mesh.device), op="avg")
    return float(total) / num_batches


# --------------------------------------------------------------------------- what users see
def _progress(job: TrainJob, start: int):
    from tqdm import tqdm

    return tqdm(total=job.steps, initial=start, desc="plait train", unit="step", dynamic_ncols=True,
                file=sys.stderr)


def _report(job: TrainJob, record: StepRecord, bar) -> None:
    if job.json:
        print(json.dumps({k: v for k, v in asdict(record).items() if v is not None}), flush=True)
        return
    postfix = {"loss": f"{record.loss:.4f}", "lr": f"{record.lr:.2e}", "tok/s": f"{record.tokens_per_s:,.0f}"}
    if record.eval_loss is not None:
        postfix["eval"] = f"{record.eval_loss:.4f}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(1)


def _print_summary(job: TrainJob, summary: Summary) -> None:
    records = summary.records
    steps = len(records)
    train_seconds = sum(r.seconds for r in records)
    out = {"summary": True, "steps_run": steps, "final_step": records[-1].step if records else summary.start_step,
           "first_loss": records[0].loss if records else None, "final_loss": records[-1].loss if records else None,
           "eval_loss": summary.eval_loss,
           "tokens_per_s": steps * job.global_batch * job.seq / train_seconds if train_seconds else None,
           "seconds": round(summary.seconds, 3), "checkpoint": summary.checkpoint, "layout": job.parallel.short()}
    if job.json:
        print(json.dumps(out), flush=True)
        return
    print(f"plait train: {steps} steps ({job.parallel.short()}), loss {out['first_loss']:.4f} -> "
          f"{out['final_loss']:.4f}" + (f", eval loss {summary.eval_loss:.4f}" if summary.eval_loss is not None
                                        else "")
          + (f", {out['tokens_per_s']:,.0f} tokens/s" if out["tokens_per_s"] else "")
          + f", {summary.seconds:.1f} s" + (f"; saved {summary.checkpoint}" if summary.checkpoint else ""),
          flush=True)


__all__ = ["train_rank", "StepRecord", "Summary", "NonFiniteError", "model_config", "parameter_shapes", "step_dirs"]
