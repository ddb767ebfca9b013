"""plait's GPT trained by plait.train on synthetic data: the jobs that tests compare across layouts.

``job_dict(**settings)`` is a small float64 job (AdamW without weight decay, constant lr, no
clipping unless asked) on the synthetic source, so every layout trains on the same batches
from the same initial weights (both drawn from the seed). ``run_jobs`` runs several jobs one
after another on the same ranks (one start-up for all); ``checkpoint_tensors`` reads a
checkpoint's tensors back (the model and the optimizer state, whole, by name), which is how
tests compare the parameters and AdamW moments a layout ends with.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

MODEL = "layers=4,hidden=16,heads=4,vocab=32"
SEQ = 8
# float64 sums in another order differ by ~1e-16 relative; Adam divides by sqrt(v) + 1e-8, so a
# gradient's rounding moves its update by at most lr * 1e-16 / 1e-8: far below these bounds
LOSS_RTOL = 1e-9
TENSOR_RTOL, TENSOR_ATOL = 1e-9, 1e-12


def job_dict(**settings) -> dict:
    """A TrainJob mapping: 3 steps of the 4-layer GPT on synthetic data, ``settings`` override."""
    base = dict(gpt=MODEL, synthetic=True, seq=SEQ, global_batch=8, microbatches=2, steps=3, seed=1, lr=1e-3,
                dtype="float64", weight_decay=0.0, lr_schedule="constant", warmup=0, clip_grad=0.0, bucket_mb=0.002)
    base.update(settings)
    return base


def run_jobs(rank: int, world: int, jobs: list[dict]) -> list[dict]:
    """Every job in turn on these ranks: per job its losses, gradient norms, DP overlap flags, this rank's
    optimizer state bytes and its checkpoint (when it saves)."""
    import torch.distributed as dist

    from plait.train import TrainJob, train_rank

    dist.init_process_group("gloo")
    out = []
    for spec in jobs:
        summary = train_rank(TrainJob.from_dict(spec), show=False)
        out.append(dict(losses=[r.loss for r in summary.records], norms=[r.grad_norm for r in summary.records],
                        overlapped=[r.dp_overlapped for r in summary.records],
                        state_bytes=summary.optimizer_state_bytes, checkpoint=summary.checkpoint))
    dist.destroy_process_group()
    return out


def checkpoint_tensors(checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of a plait.train checkpoint: the model's by name, the optimizer's as ``optimizer/NAME``."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(Path(checkpoint).rglob("*.safetensors")):
        prefix = "optimizer/" if path.parent.name == "optimizer" else ""
        out.update({prefix + name: value for name, value in load_file(str(path)).items()})
    return out


def assert_same_run(got: dict, want: dict, where: str) -> None:
    """The same losses (and gradient norms), and checkpoints of the same tensors, within the module's bounds."""
    assert got["losses"] == pytest.approx(want["losses"], rel=LOSS_RTOL), \
        f"{where}: losses {got['losses']} vs {want['losses']}"
    assert got["norms"] == pytest.approx(want["norms"], rel=LOSS_RTOL), f"{where}: grad norms"
    mine, reference = checkpoint_tensors(got["checkpoint"]), checkpoint_tensors(want["checkpoint"])
    assert mine.keys() == reference.keys(), f"{where}: tensors {sorted(mine.keys() ^ reference.keys())}"
    assert any(name.endswith(".exp_avg_sq") for name in reference), f"{where}: no AdamW state saved"
    for name, value in reference.items():
        torch.testing.assert_close(mine[name], value, rtol=TENSOR_RTOL, atol=TENSOR_ATOL, msg=f"{where}: {name}")
