"""plait train on a tiny transformers Llama and a token file made here, against a plain loop.

The reference is written in this file with transformers and torch.optim.AdamW on the same
sequences (sequence i = tokens[i*seq : i*seq+seq+1], step s takes sequences s*B .. s*B+B-1
wrapping), in float64; every layout's losses must equal it to 1e-9 relative. To keep the
suite fast, each run_ranks call runs several jobs one after another on the same ranks.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch

from hf_models import VOCAB, load_reference, save_tiny
from plait.launch import RanksFailed, run_ranks

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

SEQ, BATCH, STEPS, LR = 8, 4, 4, 3e-3
TOL = 1e-9


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    save_tiny("llama", root / "model")
    save_tiny("llama_mqa", root / "mqa", seed=1)    # one KV head (replicated over TP), tied embeddings
    tokens = np.random.default_rng(0).integers(0, VOCAB, 7 * SEQ + 1).astype(np.uint16)  # 7 sequences: wraps
    tokens.tofile(root / "data.bin")
    return {"model": str(root / "model"), "mqa": str(root / "mqa"), "data": str(root / "data.bin"), "root": root}


def job_dict(files, **overrides) -> dict:
    base = dict(model=files["model"], data=files["data"], seq=SEQ, global_batch=BATCH, steps=STEPS, lr=LR,
                dtype="float64", weight_decay=0.0, lr_schedule="constant", warmup=0, clip_grad=0.0)
    base.update(overrides)
    return base


def reference_losses(files, steps=STEPS, clip=0.0, weight_decay=0.0, schedule="constant", warmup=0,
                     model=None) -> list[float]:
    """The plain single-process loop: transformers model, torch AdamW, the same sequences."""
    from plait.train.optim import lr_factor

    model = model if model is not None else load_reference(files["model"])
    tokens = np.fromfile(files["data"], dtype=np.uint16).astype(np.int64)
    count = (len(tokens) - 1) // SEQ
    params = list(model.parameters())
    groups = ([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
               {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}] if weight_decay
              else [{"params": params, "weight_decay": 0.0}])
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = LR * lr_factor(step, steps=steps, warmup=warmup, schedule=schedule, min_ratio=0.0)
        rows = [tokens[(i % count) * SEQ:(i % count) * SEQ + SEQ + 1] for i in range(step * BATCH, (step + 1) * BATCH)]
        batch = torch.from_numpy(np.stack(rows))
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _run_jobs(rank: int, world: int, jobs: list[dict]) -> list:
    """Every job in turn on these ranks; a job's outcome is its losses or its error message."""
    import torch.distributed as dist

    from plait.train import TrainJob, train_rank

    dist.init_process_group("gloo")
    out = []
    for spec in jobs:
        try:
            out.append([r.loss for r in train_rank(TrainJob.from_dict(spec), show=False).records])
        except ValueError as err:
            out.append(f"error: {err}")
    dist.destroy_process_group()
    return out


def assert_close(got, want, what):
    assert isinstance(got, list), f"{what}: {got}"
    assert len(got) == len(want), f"{what}: {len(got)} losses, expected {len(want)}"
    for step, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= TOL * abs(w), f"{what}: step {step + 1} loss {g!r} != reference {w!r}"


def test_lr_schedule_values():
    from plait.train.optim import lr_factor

    f = lambda s, kind, warmup=2: lr_factor(s, steps=10, warmup=warmup, schedule=kind, min_ratio=0.1)  # noqa: E731
    assert [f(s, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert f(2, "cosine") == pytest.approx(1.0) and f(10, "cosine") == pytest.approx(0.1)
    assert f(6, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert f(2, "linear") == pytest.approx(1.0) and f(10, "linear") == pytest.approx(0.1)
    assert f(5, "linear", warmup=0) == pytest.approx(0.1 + 0.9 * (1 - 5 / 10))


def test_single_process_equals_plain_loop(files):
    from plait.train import TrainJob, train_rank

    want = reference_losses(files)
    got = [r.loss for r in train_rank(TrainJob.from_dict(job_dict(files)), show=False).records]
    assert_close(got, want, "(1,1,1)")


def test_two_ranks_layouts_and_resume(files, tmp_path):
    """dp 2; pp 2 with zb1p; ZeRO-1 at dp 2; 2+2 resumed steps on the same and another layout; tied
    embeddings across pipeline ranks with clipping."""
    want = reference_losses(files)
    save = str(tmp_path / "ck")
    jobs = [job_dict(files, dp=2, microbatches=2),
            job_dict(files, pp=2, schedule="zb1p", microbatches=2),
            job_dict(files, dp=2, zero=1, steps=2, save=save, save_every=1, keep=2),
            job_dict(files, pp=2, microbatches=2, resume=save, save=str(tmp_path / "ck2")),   # another layout
            job_dict(files, dp=2, zero=1, resume=save, save=save, keep=2)]                   # the same layout
    # embeddings tied across pipeline ranks: gradients summed over PP, the head counted once in the norm
    jobs.append(job_dict(files, model=files["mqa"], pp=2, clip_grad=0.05, save=str(tmp_path / "tied"), steps=2))
    want_tied = reference_losses(files, steps=2, clip=0.05, model=load_reference(files["mqa"]))
    results = run_ranks(_run_jobs, 2, jobs, timeout=400)
    for rank, outcome in enumerate(results):
        assert_close(outcome[5], want_tied, f"rank {rank} tied embeddings over (1,2,1)")
        assert_close(outcome[0], want, f"rank {rank} (2,1,1)")
        assert_close(outcome[1], want, f"rank {rank} (1,2,1) zb1p")
        assert_close(outcome[2], want[:2], f"rank {rank} ZeRO-1 dp2, first 2 steps")
        assert_close(outcome[3], want[2:], f"rank {rank} resumed on (1,2,1)")
        assert_close(outcome[4], want[2:], f"rank {rank} resumed on the same layout")
    kept = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert kept == ["step-00000002", "step-00000004"], kept   # saved 1, 2, then 4 (the end); keep=2
    from safetensors.torch import load_file

    names = load_file(str(tmp_path / "tied" / "step-00000002" / "optimizer" / "part-00000-of-00002.safetensors"))
    assert names["model.embed_tokens.weight.exp_avg"].shape[0] == VOCAB   # the tied head is stored once, as this


def test_four_ranks_tp_pp_with_clipping_and_decay(files, tmp_path):
    """(1,2,2) 1f1b; ZeRO-1 at (2,1,2) with full recompute on a model whose one KV head is replicated
    over TP (its rows count once in the clipping norm)."""
    opts = dict(clip_grad=0.05, weight_decay=0.1, lr_schedule="cosine", warmup=1)
    want = reference_losses(files, clip=0.05, weight_decay=0.1, schedule="cosine", warmup=1)
    want_mqa = reference_losses(files, clip=0.05, weight_decay=0.1, schedule="cosine", warmup=1,
                                model=load_reference(files["mqa"]))
    jobs = [job_dict(files, pp=2, tp=2, microbatches=2, schedule="1f1b", **opts),
            job_dict(files, model=files["mqa"], dp=2, tp=2, zero=1, recompute="full", **opts)]
    results = run_ranks(_run_jobs, 4, jobs, timeout=600)
    for rank, outcome in enumerate(results):
        assert_close(outcome[0], want, f"rank {rank} (1,2,2) 1f1b")
        assert_close(outcome[1], want_mqa, f"rank {rank} MQA (2,1,2) ZeRO-1, recompute full")


def test_recompute_selective_mixed_bf16_and_nonfinite_stop(files):
    from plait.train import TrainJob, train_rank
    from plait.train.loop import NonFiniteError

    want = reference_losses(files, steps=2)
    got = [r.loss for r in train_rank(TrainJob.from_dict(job_dict(files, steps=2, recompute="selective")),
                                      show=False).records]
    assert_close(got, want, "recompute selective")
    mixed = [r.loss for r in train_rank(TrainJob.from_dict(job_dict(files, steps=2, dtype="float32", mixed="bf16")),
                                        show=False).records]
    assert mixed != got and all(abs(m - w) < 2e-2 * w for m, w in zip(mixed, want)), (mixed, want)  # bf16 GEMMs
    with pytest.raises(NonFiniteError, match=r"step \d+: the loss is"):
        train_rank(TrainJob.from_dict(job_dict(files, steps=6, lr=1e30)), show=False)


def _die_at_step_3(rank: int, world: int, spec: dict) -> list[float]:
    from plait.train import TrainJob, train_rank

    def on_step(record):
        if rank == 1 and record.step == 3:
            os._exit(9)

    return [r.loss for r in train_rank(TrainJob.from_dict(spec), on_step, show=False).records]


def test_killed_rank_ends_the_job_and_resume_reproduces(files, tmp_path):
    from plait.train import TrainJob, train_rank

    save = str(tmp_path / "ck")
    spec = job_dict(files, dp=2, save=save, save_every=2)
    start = time.monotonic()
    with pytest.raises(RanksFailed, match=r"ranks \[1\] died"):
        run_ranks(_die_at_step_3, 2, spec, timeout=300, env={"PLAIT_TIMEOUT_S": "20"})
    assert time.monotonic() - start < 120
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["step-00000002"]   # no half-written step 3
    got = [r.loss for r in train_rank(TrainJob.from_dict(job_dict(files, save=save, resume="latest")),
                                      show=False).records]
    assert_close(got, reference_losses(files)[2:], "resumed after the killed rank")


def test_bad_files_are_refused_before_training(files, tmp_path):
    """Each a ValueError naming the file, raised before any communication; nothing is overwritten."""
    from plait.train import TrainJob, train_rank

    def refused(match, **overrides):
        with pytest.raises(ValueError, match=match):
            train_rank(TrainJob.from_dict(job_dict(files, **overrides)), show=False)

    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    refused(r"empty\.bin: the token file is empty", data=str(empty))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    refused(r"odd\.bin: 3 bytes is not a whole number of uint16", data=str(odd))
    big = tmp_path / "big.u32"
    np.array([1, 2, VOCAB + 5, 3] * 8, dtype=np.uint32).tofile(big)
    refused(rf"big\.u32: token id {VOCAB + 5} at position 2 is not below the model's vocabulary size {VOCAB}",
            data=str(big))

    save = tmp_path / "ck"
    train_rank(TrainJob.from_dict(job_dict(files, steps=1, save=str(save))), show=False)
    good = save / "step-00000001"
    before = {p: p.read_bytes() for p in good.rglob("*") if p.is_file()}

    truncated = tmp_path / "truncated"
    import shutil

    shutil.copytree(good, truncated)
    part = truncated / "optimizer" / "part-00000-of-00001.safetensors"
    part.write_bytes(part.read_bytes()[:-64])
    refused(r"part-00000-of-00001\.safetensors: not a readable safetensors file", resume=str(truncated))
    (truncated / "train_state.json").write_text('{"step": 1, "form')
    refused(r"train_state\.json: truncated or corrupt", resume=str(truncated))

    other = tmp_path / "other"
    save_tiny("llama_mqa", other / "model")
    refused(r"a checkpoint of another model", model=str(other / "model"), resume=str(good))
    refused(r"other data settings \(seq: checkpoint 8, job 4\)", seq=4, resume=str(good))

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    refused(r"a-file/ck: cannot write checkpoints there", save=str(blocker / "ck"))   # even root cannot

    # an error while writing (here: the temporary directory's name is taken) keeps the last checkpoint
    (save / ".tmp-step-00000002").write_text("")
    refused(r"writing checkpoint .*step-00000002 failed .*the previous checkpoint .*step-00000001 is intact",
            steps=2, save=str(save), resume="latest")
    assert sorted(p.name for p in save.iterdir()) == [".tmp-step-00000002", "step-00000001"]
    assert {p: p.read_bytes() for p in good.rglob("*") if p.is_file()} == before


def test_batches_wrap_shuffle_and_dp_slices(files):
    from plait.train.data import Batches, TokenFile

    data = TokenFile(files["data"], SEQ, VOCAB)
    assert len(data) == 7
    plain = Batches(data, global_batch=4, dp=2)
    assert plain.indices(1).tolist() == [4, 5, 6, 0]                 # wraps at the end of the file
    ids, targets = plain.batch(1, dp_rank=1)                         # DP rank 1: rows 2..3 of the batch
    tokens = np.fromfile(files["data"], dtype=np.uint16).astype(np.int64)
    assert ids[0].tolist() == tokens[6 * SEQ:7 * SEQ].tolist() and targets[1].tolist() == tokens[1:SEQ + 1].tolist()
    shuffled = Batches(data, global_batch=7, dp=1, shuffle=True, seed=3)
    epochs = [shuffled.indices(s).tolist() for s in range(3)]
    assert all(sorted(e) == list(range(7)) for e in epochs)          # each epoch sees each sequence once
    assert epochs[0] != epochs[1] and epochs[0] != list(range(7))
    assert Batches(data, 7, 1, True, seed=3).indices(1).tolist() == epochs[1]   # a function of (seed, step)


def test_data_prepare_tokenizes_with_eos_between_documents(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    from plait.cli import main

    words = ["<eos>", "hello", "world", "plait", "trains"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text('{"text": "plait trains"}\n{"text": "world"}\n')
    out = tmp_path / "data.bin"
    assert main(["data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--input", str(tmp_path / "a.txt"),
                 str(tmp_path / "b.jsonl"), "--output", str(out)]) == 0
    assert np.fromfile(out, dtype=np.uint16).tolist() == [1, 2, 0, 3, 4, 0, 2, 0]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    assert main(["data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--input", str(tmp_path / "bad.jsonl"),
                 "--output", str(tmp_path / "x.bin")]) == 2
    assert not (tmp_path / "x.bin").exists()


def test_cli_from_config_with_job_file(files, tmp_path, capsys):
    """plait train job.yaml --json, from a transformers config.json: the reference is the same init (seed)."""
    import json

    import transformers as T

    from hf_models import tiny_config
    from plait.cli import main

    tiny_config("llama").to_json_file(str(tmp_path / "config.json"))
    job = {k: v for k, v in job_dict(files, steps=2).items() if k != "model"}
    job["config"] = str(tmp_path / "config.json")
    (tmp_path / "job.yaml").write_text("\n".join(f"{k}: {v}" for k, v in job.items()))
    assert main(["train", str(tmp_path / "job.yaml"), "--json", "--seed", "5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    torch.manual_seed(5)
    model = T.AutoModelForCausalLM.from_config(tiny_config("llama")).to(torch.float64)
    assert_close([line["loss"] for line in lines[:2]], reference_losses(files, steps=2, model=model), "--config")
    assert set(lines[0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s"} and lines[-1]["summary"]

    (tmp_path / "typo.yaml").write_text(f"data: {files['data']}\nmodel: {files['model']}\nglobal_bacth: 4\n")
    assert main(["train", str(tmp_path / "typo.yaml")]) == 2
    assert "unknown setting 'global_bacth'; did you mean 'global_batch'?" in capsys.readouterr().err
    assert main(["train", "--model", files["model"], "--data", files["data"], "--lr", "nan"]) == 2
    assert "lr must be a finite number" in capsys.readouterr().err


def test_plan_emit_feeds_plait_train(files, tmp_path, capsys):
    """The planner's choice becomes a run: plait plan --emit job.yaml, then plait train job.yaml."""
    import json

    from plait.cli import main

    job = tmp_path / "job.yaml"
    assert main(["plan", "--layers", "4", "--hidden", "32", "--heads", "4", "--ffn", "48", "--seq", str(SEQ),
                 "--vocab", str(VOCAB), "--gpus", "1", "--global-batch", str(BATCH), "--dp", "1", "--pp", "1",
                 "--tp", "1", "--emit", str(job)]) == 0
    capsys.readouterr()
    assert main(["train", str(job), "--model", files["model"], "--data", files["data"], "--steps", "1",
                 "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert lines[-1]["summary"] and lines[-1]["layout"] == "dp1 pp1 tp1 1f1b zero1" and math.isfinite(lines[0]["loss"])
