"""plait.from_pretrained keeps each rank near its own shard plus one tensor, not the whole model.

A transformers Llama of about 620 MB (float32, random weights) is saved as safetensors; on
2 ranks, tp=2 and then pp=2, each rank measures its peak resident memory increase during
``from_pretrained`` (VmHWM reset through /proc/self/clear_refs). The bound is computed from
the model's dimensions: the bytes of the tensors (or TP slices) the rank keeps, plus the
largest single tensor (a row-parallel slice is strided, so reading it touches the whole
stored tensor's pages), plus a fixed slack for allocator and import overhead. The whole
model would exceed it.
"""
from __future__ import annotations

import sys

import pytest
import torch

from plait.launch import run_ranks

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")

SLACK = 64 << 20
FLOAT = 4


def _load_and_measure(rank: int, world: int, directory: str, pp: int, tp: int) -> dict:
    import transformers  # noqa: F401 - imported before measuring: imports are not the loader's memory
    from transformers.models.llama import modeling_llama  # noqa: F401

    import plait
    from plait.bench.common import PeakResident

    mesh = plait.init_mesh(pp=pp, tp=tp)
    with PeakResident() as peak:
        model = plait.from_pretrained(directory, mesh)
    names = sorted(name for name, _ in model.named_model_parameters())
    held = sum(p.numel() * p.element_size() for _, p in model.named_model_parameters())
    plait.destroy_mesh()
    return dict(increase=peak.increase, names=names, held=held)


def _share_bytes(dims, names: list[str], tp: int) -> int:
    """Bytes a rank keeps of ``names``: matrices split over tp, vectors whole (Llama's plan at tp | kv heads)."""
    shapes = dims.shapes()
    return sum(torch.Size(shapes[n]).numel() * FLOAT // (tp if len(shapes[n]) == 2 else 1) for n in names)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from plait.bench.hf import LlamaDims, save_random_llama

    dims = LlamaDims(layers=8, hidden=1024, heads=16, kv_heads=4, ffn=2816, vocab=32000)
    directory = tmp_path_factory.mktemp("llama620mb")
    save_random_llama(directory, dims)
    return dims, str(directory)


@pytest.mark.parametrize("pp,tp", [(1, 2), (2, 1)])
def test_from_pretrained_peak_memory_per_rank(checkpoint, pp, tp):
    dims, directory = checkpoint
    shapes = dims.shapes()
    whole = sum(torch.Size(s).numel() for s in shapes.values()) * FLOAT
    largest = max(torch.Size(s).numel() for s in shapes.values()) * FLOAT
    results = run_ranks(_load_and_measure, pp * tp, directory, pp, tp, timeout=300)
    if pp > 1:   # each pipeline rank holds a disjoint part of the stored tensors; together all of them
        parts = [set(r["names"]) for r in results]
        assert set.union(*parts) == set(shapes) and sum(map(len, parts)) == len(shapes)
    else:
        assert all(set(r["names"]) == set(shapes) for r in results)
    for rank, r in enumerate(results):
        share = _share_bytes(dims, r["names"], tp)
        assert r["held"] == share, f"rank {rank} holds {r['held']} bytes of parameters, expected {share}"
        bound = share + largest + SLACK
        mib = lambda b: f"{b / 2 ** 20:.0f} MiB"  # noqa: E731
        print(f"pp={pp} tp={tp} rank {rank}: peak increase {mib(r['increase'])}, share {mib(share)}, "
              f"largest tensor {mib(largest)}, whole model {mib(whole)}")
        assert share <= r["increase"] <= bound, (
            f"rank {rank} (pp={pp}, tp={tp}): peak resident increase {mib(r['increase'])} during from_pretrained, "
            f"allowed {mib(bound)} = its share {mib(share)} + largest tensor {mib(largest)} + slack {mib(SLACK)}; "
            f"the whole model is {mib(whole)}")
        assert bound < whole   # the bound is tight enough to catch a rank reading the whole model
