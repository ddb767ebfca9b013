"""plait.train checkpoints of plait's GPT move between (dp, pp, tp) layouts, with and without ZeRO-1.

A checkpoint is whole tensors by name (the model, and the AdamW moments under optimizer/), so:

- the checkpoint a layout saves equals the one-process run's (same names, the values to the bounds of
  tests/gpt_jobs.py), for a pipeline with virtual stages and for ZeRO-1 (its DP shards gathered);
- loading it on another layout and saving it again gives the very same bytes of every tensor: each rank
  took its own slices of the parameters and of the moments, and nothing was lost or moved (plain ->
  ZeRO-1, ZeRO-1 -> plain, TP, PP and virtual-stage counts changed); a ZeRO-1 rank holds only its
  1/dp of the moments;
- a job resumed from it on another layout continues the one-process run: the losses of the steps after
  it and the final parameters and moments are the uninterrupted run's.

What the old sharded .pt format's tests also covered lives elsewhere now: a checkpoint of another model
is refused naming what differs (tests/test_train_gpt.py, tests/test_train.py), damaged files are refused
naming the file (tests/test_checkpoint_files.py), and the whole model is one safetensors state dict that
any layout loads (``plait.parallelize(..., source=SafetensorsSource(dir))``, exercised here).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt_jobs import assert_same_run, checkpoint_tensors, job_dict, run_jobs
from plait.launch import run_ranks

pytest.importorskip("safetensors")

SAVED = {"pp2 tp2 vpp2": dict(pp=2, tp=2, vpp=2, schedule="interleaved"), "dp2 tp2 zero1": dict(dp=2, tp=2, zero=1)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints after step 1 of the layouts in SAVED and of one process; the one-process run of 2 steps."""
    root = tmp_path_factory.mktemp("ckpt")
    one = run_ranks(run_jobs, 1, [job_dict(steps=1, save=str(root / "one")), job_dict(steps=2, save=str(root / "two"))])
    names = list(SAVED)
    four = run_ranks(run_jobs, 4, [job_dict(steps=1, save=str(root / n.replace(" ", "-")), **SAVED[n]) for n in names],
                     timeout=300)
    out = {"one": one[0][0], "one, 2 steps": one[0][1]}
    out.update({name: four[0][i] for i, name in enumerate(names)})
    return out


def test_saved_checkpoints_equal_one_process(saved):
    for name in SAVED:
        assert_same_run(saved[name], saved["one"], name)


def _reload_and_save(rank: int, world: int, tasks: list[tuple[dict, str, str]]) -> list[dict]:
    """Per task (job settings, checkpoint, target): load the checkpoint as a resumed job does (every check,
    the model's and the optimizer's slices of this rank), then save it again into target at once."""
    import torch.distributed as dist

    import plait
    from plait.train import TrainJob
    from plait.train.checkpoint import check_checkpoint, load_optimizer_state, save_checkpoint
    from plait.train.loop import _fingerprint
    from plait.train.model import build_model, model_config, parameter_shapes
    from plait.train.optim import Optimizer

    dist.init_process_group("gloo")
    out = []
    for spec, source, target in tasks:
        job, source = TrainJob.from_dict(spec), Path(source)
        config = model_config(job)
        shapes, tied = parameter_shapes(config)
        state = check_checkpoint(source, shapes, _fingerprint(job), tied)
        mesh = plait.init_mesh(job.parallel)
        model = build_model(job, config, mesh, source)
        optimizer = Optimizer(model, job, start_step=state["step"])
        load_optimizer_state(source, state, model, optimizer)
        moments = sum(p.numel() * p.element_size() * len(state["optimizer_keys"]) for p in optimizer.params)
        path = save_checkpoint(target, state["step"], model, optimizer, {"fingerprint": _fingerprint(job)}, keep=1)
        out.append(dict(checkpoint=str(path), state_bytes=optimizer.state_bytes(), moment_bytes=moments))
    dist.destroy_process_group()
    return out


RELOADS = [  # (saved on, loaded on)
    ("pp2 tp2 vpp2", dict(tp=2)), ("pp2 tp2 vpp2", dict()), ("pp2 tp2 vpp2", dict(pp=2)),
    ("pp2 tp2 vpp2", dict(dp=2, zero=1)), ("dp2 tp2 zero1", dict(pp=2)), ("dp2 tp2 zero1", dict(tp=2)),
]


def test_reload_on_other_layouts_gives_the_same_tensors(saved, tmp_path):
    by_world: dict[int, list[int]] = {}
    for i, (_, layout) in enumerate(RELOADS):
        by_world.setdefault(layout.get("dp", 1) * layout.get("pp", 1) * layout.get("tp", 1), []).append(i)
    for world, indices in sorted(by_world.items()):
        tasks = [(job_dict(steps=1, **RELOADS[i][1]), saved[RELOADS[i][0]]["checkpoint"], str(tmp_path / str(i)))
                 for i in indices]
        results = run_ranks(_reload_and_save, world, tasks, timeout=300)
        for k, i in enumerate(indices):
            source, layout = RELOADS[i]
            where = f"saved on {source}, loaded on {layout or 'one process'}"
            again = checkpoint_tensors(results[0][k]["checkpoint"])
            want = checkpoint_tensors(saved[source]["checkpoint"])
            assert again.keys() == want.keys(), where
            for name, value in want.items():
                assert torch.equal(again[name], value), f"{where}: {name} changed"
            state = json.loads((Path(results[0][k]["checkpoint"]) / "train_state.json").read_text())
            assert (state["step"], state["adam_step"]) == (1, 1.0), where
            if layout.get("zero"):   # each DP rank holds its half of the moments (and the scalar steps)
                for rank in results:
                    mine = rank[k]
                    assert mine["state_bytes"] < mine["moment_bytes"] / layout["dp"] + 4096, where


def test_resume_on_another_layout_continues_the_run(saved, tmp_path):
    """Step 2 from the step-1 checkpoints, on other layouts (ZeRO-1 on, off), equals the 2-step run."""
    want = dict(saved["one, 2 steps"], losses=saved["one, 2 steps"]["losses"][1:],
                norms=saved["one, 2 steps"]["norms"][1:])
    jobs = [job_dict(steps=2, dp=2, zero=1, resume=saved["pp2 tp2 vpp2"]["checkpoint"], save=str(tmp_path / "a")),
            job_dict(steps=2, pp=2, resume=saved["dp2 tp2 zero1"]["checkpoint"], save=str(tmp_path / "b"))]
    results = run_ranks(run_jobs, 2, jobs, timeout=300)
    for outcome, where in zip(results[0], ("pp2 tp2 vpp2 -> dp2 zero1", "dp2 tp2 zero1 -> pp2")):
        assert_same_run(outcome, want, f"resumed {where}")
