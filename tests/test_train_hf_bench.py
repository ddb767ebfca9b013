"""``plait bench train_hf`` runs end to end on a very small Llama: every contender trains the same losses."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")   # transformers' tp_plan


@pytest.mark.slow
def test_bench_train_hf_smoke(tmp_path, monkeypatch):
    from plait.bench import train_hf

    monkeypatch.chdir(tmp_path)          # outside a checkout: results go to ./plait-bench-results
    assert train_hf.main(["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--ffn", "96",
                          "--vocab", "128", "--seq", "16", "--global-batch", "2", "--steps", "3",
                          "--warmup", "1"]) == 0
    [path] = (tmp_path / "plait-bench-results").glob("train_hf-*.json")
    result = json.loads(path.read_text())["results"]
    assert list(result["contenders"]) == ["plait dp=2", "torch DDP dp=2", "plait tp=2", "transformers tp=2"]
    assert result["transformers_tp_error"] is None
    for name, contender in result["contenders"].items():
        assert len(contender["losses"]) == 3 and contender["tokens_per_s"] > 0, name
        assert contender["loss_rel_diff_vs_ddp"] < 1e-5, name      # float32, other reduction orders
    for mode, entry in result["recompute"].items():
        assert entry["loss_rel_diff_vs_none"] < 1e-6, mode
        assert entry["activation_mib"] > 0 and entry["planner_mib"] > 0, mode
    checkpoint = result["checkpoint"]
    assert checkpoint["save_s"] > 0 and checkpoint["load_s"] > 0 and checkpoint["bytes"] > 0
    assert [t["title"].split(" ")[0] for t in result["tables"]] == ["Throughput", "Targets", "Recomputation",
                                                                   "Checkpoint"]
