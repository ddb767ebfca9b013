"""``plait bench serve`` runs end to end on a very small model and records every contender."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")


@pytest.mark.slow
def test_bench_serve_smoke(tmp_path, monkeypatch):
    from plait.bench import serve

    monkeypatch.chdir(tmp_path)          # outside a checkout: results go to ./plait-bench-results
    assert serve.main(["--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--vocab", "64",
                       "--ffn", "64", "--prompt", "4", "--new", "3", "--clients", "2", "--tp", "1", "--dp", "2",
                       "--runs", "1", "--warmup", "0", "--hf-threads", "1"]) == 0
    [path] = (tmp_path / "plait-bench-results").glob("serve-*.json")
    table = json.loads(path.read_text())["results"]["table"]
    contenders = [(row[0], row[1], row[2]) for row in table["rows"]]
    assert contenders == [("plait", 1, 1), ("plait", 1, 2), ("transformers generate (1 threads)", 1, 1)]
    tokens_per_s = table["columns"].index("output_tokens_per_s")
    assert all(row[tokens_per_s] > 0 for row in table["rows"])


@pytest.mark.slow
def test_bench_serve_pp_row(tmp_path, monkeypatch):
    from plait.bench import serve

    monkeypatch.chdir(tmp_path)
    assert serve.main(["--layers", "2", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--vocab", "64",
                       "--ffn", "64", "--prompt", "4", "--new", "3", "--clients", "2", "--tp", "1", "--dp", "1",
                       "--pp", "2", "--runs", "1", "--warmup", "0", "--no-transformers"]) == 0
    [path] = (tmp_path / "plait-bench-results").glob("serve-*.json")
    table = json.loads(path.read_text())["results"]["table"]
    assert [(row[0], row[1], row[2]) for row in table["rows"]] == [("plait", 1, 1), ("plait pp=2", 1, 1)]
    tokens_per_s = table["columns"].index("output_tokens_per_s")
    assert all(row[tokens_per_s] > 0 for row in table["rows"])
