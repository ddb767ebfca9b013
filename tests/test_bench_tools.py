"""bench/common.py (result files) and bench/report.py (the README's results tables)."""

from __future__ import annotations

import json
import socket
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from plait.bench import common, report


def test_write_result_goes_to_the_checkouts_results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    (tmp_path / "deeper").mkdir()
    monkeypatch.chdir(tmp_path / "deeper")  # found by walking up from cwd

    path = common.write_result("toy", {"speedup": np.float64(1.5), "sizes": np.arange(3)}, "python bench/toy.py")

    assert path.parent == results
    document = json.loads(path.read_text())
    assert set(document) == {"name", "device", "commit", "date", "command", "machine", "results"}
    assert document["results"] == {"speedup": 1.5, "sizes": [0, 1, 2]}
    assert document["commit"] is None  # tmp_path is not a git checkout
    date = datetime.fromisoformat(document["date"])
    assert date.utcoffset() is not None and date.utcoffset().total_seconds() == 0
    assert path.name == f"toy-{common.slug(document['device'])}-{date:%Y-%m-%d}.json"


def test_write_result_outside_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = common.write_result("toy", {}, "plait bench toy")
    assert path.parent == tmp_path / common.FALLBACK_RESULTS_DIR


def test_machine_info_names_the_device_but_not_the_host() -> None:
    info = common.machine_info()
    assert info["device"] == common.device_name()
    assert info["cores"] >= 1 and info["torch"]
    host = socket.gethostname()
    if len(host) >= 4:
        assert host not in json.dumps(info)


def test_slug() -> None:
    assert common.slug("cpu: AMD EPYC 7B13") == "cpu-amd-epyc-7b13"
    assert common.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def _result(name: str, device: str, date: str, table: dict | None = None) -> dict:
    payload = {"table": table} if table else {"other": 1}
    return {"name": name, "device": device, "commit": "0123456789abcdef", "date": date,
            "command": f"plait bench {name}", "machine": {}, "results": payload}


def test_report_writes_newest_result_per_device(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    old = _result("layers", "gpu-x", "2026-01-01T00:00:00+00:00", {"columns": ["n"], "rows": [[111]]})
    new = _result("layers", "gpu-x", "2026-02-01T00:00:00+00:00",
                  {"columns": ["n", "ms", "note"], "rows": [[1024, 0.123456, "a|b"], [2048, None, "c"]]})
    cpu = _result("layers", "cpu: y", "2026-01-15T00:00:00+00:00")
    for i, doc in enumerate([old, new, cpu]):
        (results / f"r{i}.json").write_text(json.dumps(doc))
    (results / "r1.png").write_bytes(b"png")
    readme = tmp_path / "README.md"
    readme.write_text(f"# t\nbefore\n{report.START}\nstale\n{report.END}\nafter\n")

    assert report.main(["--results", str(results), "--readme", str(readme)]) == 0

    text = readme.read_text()
    assert text.startswith("# t\nbefore\n") and text.endswith(f"{report.END}\nafter\n")
    assert "stale" not in text and "| 111 |" not in text
    assert "### layers" in text
    assert "| n | ms | note |" in text and "| 1024 | 0.1235 | a\\|b |" in text and "| 2048 |  | c |" in text
    assert "gpu-x · commit `01234567` · 2026-02-01T00:00:00+00:00 · `plait bench layers`" in text
    assert "cpu: y · commit" in text
    assert "](results/r1.png)" in text


def test_report_without_markers_fails(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit) as exc:
        report.main(["--results", str(tmp_path), "--readme", str(readme)])
    assert exc.value.code != 0
    assert readme.read_text() == "# no markers\n"


def test_report_with_no_results(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.START}\n{report.END}\n")
    report.main(["--results", str(tmp_path), "--readme", str(readme)])
    assert "No results yet" in readme.read_text()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_resident_sees_a_transient_allocation() -> None:
    import torch

    with common.PeakResident() as peak:
        block = torch.ones(64 << 20, dtype=torch.uint8)   # touched: 64 MiB resident
        del block
    assert peak.increase >= 60 << 20
    assert peak.end < peak.peak


def test_hf_bench_checkpoint_has_the_transformers_model_shapes() -> None:
    pytest.importorskip("transformers")
    import torch

    from plait.bench.hf import LlamaDims
    import transformers

    dims = LlamaDims(layers=2, hidden=64, heads=8, kv_heads=2, ffn=96, vocab=101)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(dims.config())
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == dims.shapes()


def test_hf_bench_table_without_transformers_tp() -> None:
    from plait.bench.hf import table

    row = dict(ranks=1, threads_per_rank=2, step_ms=100.0, prefill_ms=30.0, load_peak_mib=[600.0],
               logits_rel_error=0.0)
    result = {"contenders": {"1 process": row, "plait tp=2 (shm)": dict(row, ranks=2, step_ms=90.0,
                                                                          load_peak_mib=[350.0, 351.0])},
              "ratios": {"step_vs_transformers_tp": None, "prefill_vs_transformers_tp": None,
                         "step_vs_one_process": 0.9, "prefill_vs_one_process": 1.0,
                         "load_memory_vs_whole_model": 351 / 600},
              "targets": {"vs_transformers_tp": 0.85, "vs_one_process": 1.1, "memory_vs_whole": 0.6}}
    rows = table(result)["rows"]
    assert rows[1][4] == "350 / 351"
    assert rows[2][2] == "-" and rows[3][2] == 0.9 and rows[4][4] == 0.585


def test_report_renders_titled_tables(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    doc = _result("multi", "cpu: z", "2026-03-01T00:00:00+00:00")
    doc["results"] = {"tables": [{"title": "Speed", "columns": ["a"], "rows": [[1]]},
                                 {"title": "Memory", "columns": ["b", "c"], "rows": [[2, 3.5]]}]}
    (results / "m.json").write_text(json.dumps(doc))
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.START}\n{report.END}\n")
    report.main(["--results", str(results), "--readme", str(readme)])
    text = readme.read_text()
    assert text.index("**Speed**") < text.index("| a |") < text.index("**Memory**") < text.index("| b | c |")
    assert "| 2 | 3.5 |" in text


def test_train_hf_clip_of_plain_gradients_equals_torch() -> None:
    import torch

    from plait.bench.train_hf import _clip_mixed

    torch.manual_seed(0)
    ours, theirs = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)], []
    for p in ours:
        p.grad = torch.randn_like(p) * 3
        theirs.append(torch.nn.Parameter(p.detach().clone()))
        theirs[-1].grad = p.grad.clone()
    norm = _clip_mixed(ours, 1.0)
    want = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert abs(norm - float(want)) < 1e-5 * float(want)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad)


def test_train_hf_planner_predicts_less_activation_memory_with_recompute() -> None:
    from plait.bench.hf import LlamaDims
    from plait.bench.train_hf import Run, planner_activations

    dims, run = LlamaDims(layers=4, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=1000), Run(seq=64, global_batch=4)
    none, selective, full = (planner_activations(dims, run, 2, mode) for mode in ("none", "selective", "full"))
    assert full < selective <= none
    # full recomputation keeps each layer's input (2 bytes x s b h in the planner's count, x2 for fp32)
    assert full < none - 3 * 4 * run.seq * (run.global_batch // 2) * dims.hidden


def test_shard_runs_match_a_plain_scan() -> None:
    import random

    from plait.parallel.shard import ShardSpec

    def scan(index, size):
        out = []
        for i in index:
            if i < size:
                out.append((out.pop()[0], i + 1) if out and out[-1][1] == i else (i, i + 1))
        return out

    rng = random.Random(0)
    for _ in range(500):
        index = tuple(rng.randint(0, 15) for _ in range(rng.randint(0, 12)))
        index = tuple(sorted(index)) if rng.random() < 0.5 else index
        size = rng.randint(0, 16)
        assert ShardSpec("w", 0, index).runs(size) == scan(index, size), (index, size)
    assert ShardSpec("w", 0, tuple(range(32000)) + (32000, 32001)).runs(32000) == [(0, 32000)]


def test_report_renders_targets_beside_the_table(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    doc = _result("serve", "cpu: y", "2026-01-15T00:00:00+00:00", {"columns": ["n"], "rows": [[1]]})
    doc["results"]["targets"] = {
        "tpot_ratio": {"value": 0.75, "target": 0.8, "met": True, "of": "tpot: a / b"},
        "rps_ratio": {"value": None, "target": 1.6, "met": None, "why": "a contender did not run"}}
    (results / "r.json").write_text(json.dumps(doc))
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.START}\n{report.END}\n")
    report.main(["--results", str(results), "--readme", str(readme)])
    text = readme.read_text()
    assert "| target | value | bound | met | of |" in text
    assert "| tpot_ratio | 0.75 | 0.8 | yes | tpot: a / b |" in text
    assert "| rps_ratio |  | 1.6 | n/a | a contender did not run |" in text
