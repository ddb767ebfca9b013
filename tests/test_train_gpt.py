"""plait train --gpt (plait's reference GPT from scratch) against a plain one-process loop, on a token file
and on --synthetic data, and --tensorboard.

The reference is ``plait.models.GPT`` initialized by ``init_parameters(model, seed)`` and trained
with ``torch.optim.AdamW`` on the same sequences, in float64; every layout's losses must equal
it to 1e-9 relative, also after resuming on another layout.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from plait.launch import run_ranks
from test_train import _run_jobs, assert_close   # its tolerance (1e-9) and multi-job ranks

pytest.importorskip("safetensors")

VOCAB, SEQ, BATCH, STEPS, LR, SEED = 37, 8, 4, 4, 3e-3, 3
SPEC = f"layers=2,hidden=32,heads=4,ffn=48,vocab={VOCAB}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt") / "data.bin"
    np.random.default_rng(1).integers(0, VOCAB, 7 * SEQ + 1).astype(np.uint16).tofile(path)
    return str(path)


def job_dict(data, **overrides) -> dict:
    base = dict(gpt=SPEC, data=data, seq=SEQ, global_batch=BATCH, steps=STEPS, lr=LR, dtype="float64",
                lr_schedule="constant", warmup=0, clip_grad=0.0, seed=SEED)
    base.update(overrides)
    return base


def token_file_batch(data):
    """Step s's inputs and targets from a token file: sequence i = tokens[i*SEQ : i*SEQ+SEQ+1], wrapping."""
    tokens = np.fromfile(data, dtype=np.uint16).astype(np.int64)
    count = (len(tokens) - 1) // SEQ

    def batch(step):
        rows = [tokens[(i % count) * SEQ:(i % count) * SEQ + SEQ + 1] for i in range(step * BATCH, (step + 1) * BATCH)]
        whole = torch.from_numpy(np.stack(rows))
        return whole[:, :-1], whole[:, 1:]

    return batch


def reference_losses(data, steps=STEPS, batch=None) -> list[float]:
    """plait's GPT as a plain model, torch AdamW, on the token file's sequences (or ``batch(step)``'s)."""
    from plait.models import GPT, GPTConfig, init_parameters

    model = GPT(GPTConfig(vocab_size=VOCAB, num_layers=2, hidden=32, num_heads=4, ffn_hidden=48, seq_len=SEQ,
                          dtype=torch.float64))
    init_parameters(model, SEED)
    batch = batch or token_file_batch(data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    losses = []
    for step in range(steps):
        ids, targets = batch(step)
        loss = torch.nn.functional.cross_entropy(model(ids).reshape(-1, VOCAB), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_gpt_job_file_equals_plain_loop(data, tmp_path, capsys):
    """One process, from a YAML job file whose gpt is a mapping (preset + overrides)."""
    from plait.cli import main

    job = {k: v for k, v in job_dict(data).items() if k != "gpt"}
    lines = [f"{k}: {v}" for k, v in job.items()]
    lines += ["gpt:", "  preset: gpt-tiny", "  hidden: 32", "  ffn: 48", f"  vocab: {VOCAB}"]
    (tmp_path / "job.yaml").write_text("\n".join(lines) + "\n")
    assert main(["train", str(tmp_path / "job.yaml"), "--json"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert_close([x["loss"] for x in out[:-1]], reference_losses(data), "gpt (1,1,1) from a job file")


def test_gpt_synthetic_from_the_command_line_equals_plain_loop(capsys):
    """``plait train --synthetic``: the plain loop on the same generated batches (plait.train.data)."""
    from plait.cli import main
    from plait.train.data import SyntheticBatches

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in job_dict(None).items() if k != "data"]
    assert main(["train", *flags, "--synthetic", "--json"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    synthetic = SyntheticBatches(VOCAB, SEQ, BATCH, dp=1, seed=SEED)
    want = reference_losses(None, batch=lambda step: synthetic.batch(step, 0))
    assert_close([x["loss"] for x in out[:-1]], want, "gpt (1,1,1) --synthetic")
    assert out[-1]["final_loss"] < out[-1]["first_loss"]    # counting sequences are learnable


def test_gpt_222_and_resume_on_other_layouts(data, tmp_path):
    """(2,2,2) 1f1b; (2,2,2) with ZeRO-1 for 2 steps, resumed on (1,2,4) and on (1,1,1) for the rest."""
    from plait.train import TrainJob, train_rank

    want = reference_losses(data)
    save = str(tmp_path / "ck")
    layout = dict(dp=2, pp=2, tp=2, microbatches=2)
    jobs = [job_dict(data, **layout), job_dict(data, **layout, zero=1, steps=2, save=save),
            job_dict(data, pp=2, tp=4, microbatches=2, resume=save)]
    results = run_ranks(_run_jobs, 8, jobs, timeout=400)
    for rank, outcome in enumerate(results):
        assert_close(outcome[0], want, f"rank {rank} gpt (2,2,2)")
        assert_close(outcome[1], want[:2], f"rank {rank} gpt (2,2,2) ZeRO-1")
        assert_close(outcome[2], want[2:], f"rank {rank} gpt resumed from (2,2,2) on (1,2,4)")
    got = [r.loss for r in train_rank(TrainJob.from_dict(job_dict(data, resume=save)), show=False).records]
    assert_close(got, want[2:], "gpt resumed from (2,2,2) on (1,1,1)")


def test_gpt_spec_errors_before_training(data, tmp_path):
    from plait.train import TrainJob, train_rank

    def refused(match, **overrides):
        with pytest.raises(ValueError, match=match):
            TrainJob.from_dict(job_dict(data, **overrides))

    refused(r"unknown preset 'gpt-tny'; did you mean 'gpt-tiny'", gpt="gpt-tny,vocab=37")
    refused(r"missing vocab", gpt="gpt-tiny")
    refused(r"unknown key 'layrs'; did you mean 'layers'", gpt=SPEC + ",layrs=3")
    refused(r"heads must be a positive whole number, got '1.5'", gpt=SPEC + ",heads=1.5")
    refused(r"position table has seq=4 rows, fewer than the job's sequence length 8", gpt=SPEC + ",seq=4")
    refused(r"num_heads=4 is not divisible by tp=8", tp=8)
    refused(r"vocab_size=3 is too small for tp=4", gpt=SPEC.replace(f"vocab={VOCAB}", "vocab=3"), tp=4)
    refused(r"give exactly one of model .*, config .* and gpt", model="some-dir")
    save = tmp_path / "ck"
    train_rank(TrainJob.from_dict(job_dict(data, steps=1, save=str(save))), show=False)
    with pytest.raises(ValueError, match=r"a checkpoint of another model \(gpt.activation: checkpoint 'gelu', "
                                         r"job 'relu'\)"):
        train_rank(TrainJob.from_dict(job_dict(data, gpt=SPEC + ",activation=relu", resume=str(save))), show=False)
    with pytest.raises(ValueError, match=r"a checkpoint of another model \(tensor 'blocks.0.mlp.fc1.weight' "
                                         r"has shape \[48, 32\], the job's model needs \[64, 32\]"):
        train_rank(TrainJob.from_dict(job_dict(data, gpt=SPEC.replace("ffn=48", "ffn=64"), resume=str(save))),
                   show=False)


def test_tensorboard_scalars_per_step(data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from plait.train import TrainJob, train_rank

    logs = tmp_path / "tb"
    records = train_rank(TrainJob.from_dict(job_dict(data, steps=3, eval_fraction=0.3, eval_every=2,
                                                     tensorboard=str(logs))), show=False).records
    events = EventAccumulator(str(logs))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert set(scalars) == {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss"}
    for field, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm")):
        assert scalars[tag] == [(r.step, pytest.approx(getattr(r, field), rel=1e-6)) for r in records], tag
    assert [s for s, _ in scalars["eval/loss"]] == [2, 3]          # every 2 steps, and at the end
    assert scalars["eval/loss"][0][1] == pytest.approx(records[1].eval_loss, rel=1e-6)


def test_tensorboard_missing_is_a_clear_error(data, tmp_path, monkeypatch):
    from plait.train import TrainJob, train_rank

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)    # import fails as if not installed
    with pytest.raises(ValueError, match=r"--tensorboard needs the tensorboard package .*pip install tensorboard"):
        train_rank(TrainJob.from_dict(job_dict(data, tensorboard=str(tmp_path / "tb"))), show=False)
    assert not (tmp_path / "tb").exists()
