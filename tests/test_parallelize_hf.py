"""Hugging Face models through plait.from_pretrained / parallelize: exactly what transformers computes.

For each layout (tp, pp) every tiny family (GQA with tp > KV heads, MQA, Qwen2's QKV bias,
Mistral's sliding window, GPT-2's Conv1D; tied and untied; a prime vocabulary) loads from a
checkpoint on disk with each rank reading its slices, and in float64:
- ``logits`` equal transformers' to 1e-10 relative, on every rank;
- one backward through the pipeline engine gives transformers' gradients, gathered by name;
- ``save_pretrained`` writes a directory transformers loads to the same logits.
"""
from __future__ import annotations

import pytest
import torch

from hf_models import FAMILIES, VOCAB, load_reference, relative_error, save_tiny
from plait.launch import run_ranks

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

LAYOUTS = [(2, 1), (4, 1), (1, 2), (2, 2)]
TOL = 1e-10


def _check_family(directory, out_dir, seed: int) -> dict:
    import plait

    mesh = plait.current_mesh()
    model = plait.from_pretrained(directory, mesh, dtype=torch.float64)
    ref = load_reference(directory)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 9), generator=gen)
    targets = torch.randint(0, VOCAB, (3, 9), generator=gen)
    want = ref(ids).logits
    logits_err = relative_error(model.logits(ids), want)

    loss = model.pipeline("1f1b", num_microbatches=1).train_step(ids, targets)
    model.finish_grads()
    grads = model.full_state_dict(grads=True)
    ref_loss = torch.nn.functional.cross_entropy(want.reshape(-1, VOCAB), targets.reshape(-1))
    ref_loss.backward()
    expected = {n: p.grad for n, p in ref.named_parameters()}   # a tied head is listed once, as the embedding
    grad_err = max(relative_error(grads[n], g) for n, g in expected.items())
    missing = sorted(set(expected) - set(grads))

    plait.save_pretrained(model, out_dir, max_shard_bytes=20_000)   # small: several files and an index
    torch.distributed.barrier()
    saved_err = relative_error(load_reference(out_dir)(ids).logits, want)
    return dict(logits=logits_err, loss=abs(float(loss) - ref_loss.item()), grads=grad_err, missing=missing,
                saved=saved_err)


def _run_layout(rank: int, world: int, pp: int, tp: int, dirs: dict, out_root: str) -> dict:
    import plait

    torch.set_default_dtype(torch.float64)
    plait.init_mesh(pp=pp, tp=tp)
    results = {kind: _check_family(directory, f"{out_root}/{kind}", seed=7)
               for kind, directory in dirs.items()}
    plait.destroy_mesh()
    return results


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for i, kind in enumerate(FAMILIES):
        save_tiny(kind, root / kind, seed=i)
        dirs[kind] = str(root / kind)
    return dirs


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_hf_models_match_transformers(checkpoints, tmp_path, tp, pp):
    results = run_ranks(_run_layout, tp * pp, pp, tp, checkpoints, str(tmp_path), timeout=400)
    for rank, per_family in enumerate(results):
        for kind, r in per_family.items():
            where = f"{kind} tp={tp} pp={pp} rank {rank}"
            assert r["logits"] < TOL, f"{where}: logits differ by {r['logits']:.3g}"
            assert r["loss"] < 1e-12, f"{where}: loss differs by {r['loss']:.3g}"
            assert not r["missing"], f"{where}: no gradient gathered for {r['missing']}"
            assert r["grads"] < TOL, f"{where}: gradients differ by {r['grads']:.3g}"
            assert r["saved"] < TOL, f"{where}: the saved checkpoint's logits differ by {r['saved']:.3g}"


def _shm_layout(rank: int, world: int, pp: int, tp: int, directory: str) -> dict:
    import plait

    torch.set_default_dtype(torch.float64)
    mesh = plait.init_mesh(pp=pp, tp=tp, comm="shm")
    backends = {axis: c.backend for axis, c in mesh.comms.items()}
    model = plait.from_pretrained(directory, mesh, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    targets = torch.roll(ids, -1, dims=1)
    want = load_reference(directory)(ids).logits
    logits_err = relative_error(model.logits(ids), want)
    loss = model.pipeline("1f1b", num_microbatches=1).train_step(ids, targets)
    ref_loss = torch.nn.functional.cross_entropy(want.reshape(-1, VOCAB), targets.reshape(-1)).item()
    plait.destroy_mesh()
    return dict(backends=backends, logits=logits_err, loss=abs(float(loss) - ref_loss))


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_mesh_with_shm_communicators_runs_hf_models(checkpoints, tp, pp):
    """init_mesh(comm="shm"): every axis communicates through plait's shm backend, with transformers' results."""
    for rank, r in enumerate(run_ranks(_shm_layout, tp * pp, pp, tp, checkpoints["llama"], timeout=300)):
        assert r["backends"] == {"dp": "shm", "pp": "shm", "tp": "shm"}, r["backends"]
        assert r["logits"] < TOL, f"tp={tp} pp={pp} rank {rank}: logits differ by {r['logits']:.3g}"
        assert r["loss"] < 1e-12, f"tp={tp} pp={pp} rank {rank}: loss differs by {r['loss']:.3g}"


def test_init_mesh_rejects_unknown_comm_before_communicating():
    import plait

    with pytest.raises(ValueError, match="comm must be one of"):
        plait.init_mesh(comm="gloo")
    with pytest.raises(ValueError, match="comm='shm' runs CPU collectives"):
        plait.init_mesh(comm="shm", backend="nccl")
