"""``plait bench serve`` runs end to end on a very small model and records every contender."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")


@pytest.mark.slow
def test_bench_serve_smoke(tmp_path, monkeypatch):
    from plait.bench import serve

    monkeypatch.chdir(tmp_path)          # outside a checkout: results go to ./plait-bench-results
    assert serve.main(["--layers", "1", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--vocab", "64",
                       "--ffn", "64", "--prompt", "4", "--new", "3", "--clients", "2", "--tp", "1", "2",
                       "--dp", "2", "--runs", "1", "--warmup", "0", "--hf-threads", "1", "--peer-batch", "2",
                       "--no-http", "--no-deepspeed", "--shared-prefix", "16", "--prefix-requests", "3",
                       "--prefix-suffix", "2", "--mixed-clients", "2", "--mixed-lengths", "4", "20",
                       "--mixed-per-client", "2", "--load-new", "3", "--step-tokens", "6",
                       "--mixed-step-tokens", "5", "--load-dtype", "float32"]) == 0
    [path] = (tmp_path / "plait-bench-results").glob("serve-*.json")
    results = json.loads(path.read_text())["results"]
    table = results["table"]
    contenders = [(row[0], row[1], row[2]) for row in table["rows"]]
    load = [(f"{name}, float32", 2, 1) for name in ("plait prefix cache", "plait no prefix cache",
                                                     "plait batch 1 (load)", "plait mixed chunked",
                                                     "plait mixed whole prompts")]
    assert contenders == [("plait", 1, 1), ("plait", 2, 1), ("transformers TP", 2, 1),
                          ("transformers generate (1 threads)", 1, 1)] + load
    same = [row[-1] for row in table["rows"][4:]]
    assert same == ["reference", True, "reference", "reference", True], same     # float32, greedy
    kv = results["load"]["kv_memory"]["plait mixed chunked"]
    assert 1.0 <= kv["mean"] <= kv["max"] and kv["replica_bytes_per_token"] == kv["model_bytes_per_token"]
    for name in ("ttft_prefix_cache_over_none", "tpot_p99_mixed_chunked_over_batch1",
                 "kv_bytes_per_held_token_over_model"):
        assert results["targets"][name]["value"] > 0
    column = {name: i for i, name in enumerate(table["columns"])}
    assert all(row[column["output_tokens_per_s"]] > 0 for row in table["rows"])
    # greedy float32 on a tiny model: every contender produces plait tp=2's tokens
    assert [row[column["same_tokens"]] for row in table["rows"][:4]] == [True, "reference", True, True]
    goals = results["targets"]
    assert goals["tpot_plait_b1_over_deepspeed_autotp"]["value"] is None      # no batch-1 row, no DeepSpeed
    ratio = goals["tokens_per_s_plait_over_sequential_transformers"]
    tokens_per_s = [row[column["output_tokens_per_s"]] for row in table["rows"]]
    assert ratio["value"] == pytest.approx(tokens_per_s[1] / tokens_per_s[3], rel=1e-2)


@pytest.mark.slow
def test_bench_serve_pp_row(tmp_path, monkeypatch):
    from plait.bench import serve

    monkeypatch.chdir(tmp_path)
    assert serve.main(["--layers", "2", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--vocab", "64",
                       "--ffn", "64", "--prompt", "4", "--new", "3", "--clients", "2", "--tp", "1", "--dp", "1",
                       "--pp", "2", "--runs", "1", "--warmup", "0", "--no-transformers",
                       "--no-http", "--no-deepspeed", "--peer-batch", "99", "--shared-prefix", "0",
                       "--mixed-clients", "0"]) == 0
    [path] = (tmp_path / "plait-bench-results").glob("serve-*.json")
    table = json.loads(path.read_text())["results"]["table"]
    assert [(row[0], row[1], row[2]) for row in table["rows"]] == [("plait", 1, 1), ("plait pp=2", 1, 1)]
    tokens_per_s = table["columns"].index("output_tokens_per_s")
    assert all(row[tokens_per_s] > 0 for row in table["rows"])


def test_targets_compare_the_named_rows():
    from plait.bench.serve import COLUMNS, targets

    def row(name, tp, dp, clients, tpot, tokens_per_s, requests_per_s):
        return [name, tp, dp, clients, 1.0, 1.0, tpot, tpot, tokens_per_s, requests_per_s, True]

    rows = [row("plait", 2, 1, 1, 30.0, 33.0, 0.5), row("DeepSpeed AutoTP", 2, 1, 1, 40.0, 25.0, 0.4),
            row("transformers TP", 2, 1, 1, 60.0, 16.0, 0.2), row("plait", 2, 1, 16, 90.0, 170.0, 2.6),
            row("plait serve (HTTP)", 1, 1, 16, 80.0, 100.0, 1.0),
            row("plait serve (HTTP)", 1, 2, 16, 60.0, 150.0, 1.5),
            row("transformers generate (1 threads)", 1, 1, 16, 50.0, 20.0, 0.3),
            row("transformers generate (2 threads)", 1, 1, 16, 45.0, 25.0, 0.4)]
    assert len(rows[0]) == len(COLUMNS)
    goals = targets(rows, tp=2, peer_tp=2, clients=16, dp=2)
    assert goals["tpot_plait_b1_over_deepspeed_autotp"] | {"of": None} == {"value": 0.75, "target": 0.8,
                                                                           "met": True, "of": None}
    assert goals["tpot_plait_b1_over_transformers_tp"]["value"] == 0.5
    assert goals["tokens_per_s_plait_over_sequential_transformers"]["value"] == 6.8    # against the best (2 threads)
    assert goals["requests_per_s_http_dp_over_dp1"]["value"] == 1.5
    assert goals["requests_per_s_http_dp_over_dp1"]["met"] is False
