"""`plait plan`: tables, JSON, config files, plots, and bad input as one clear line with exit status 2."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from plait.cli import main

BASE = ["plan", "--model", "llama3-8b", "--gpu", "h100", "--gpus", "8", "--global-batch", "64"]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,fragment", [
    (["plan", "--model", "gpt-9", "--gpus", "8", "--global-batch", "8"], "unknown model preset 'gpt-9'; known:"),
    (["plan", "--model", "llama3-8b", "--gpu", "b200", "--gpus", "8", "--global-batch", "8"], "unknown gpu preset"),
    (["plan", "--model", "llama3-405b", "--gpu", "h100", "--gpus", "8", "--global-batch", "8"], "use at least"),
    (["plan", "--model", "llama3-8b", "--gpus", "16", "--global-batch", "64", "--tp", "16"], "spans nodes of 8 GPUs"),
    (BASE + ["--tp", "3"], "tp*pp = 3 does not divide the 8 GPUs"),
    (BASE + ["--tp", "8", "--pp", "1", "--vpp", "2"], "interleaved schedule needs pp >= 2"),
    (["plan", "--model", "llama3-70b", "--gpu", "h100", "--gpus", "64", "--global-batch", "1024", "--pp", "3",
      "--tp", "8", "--dp", "2"], "dp*pp*tp = 48"),
    (["plan", "--model", "llama3-8b", "--gpus", "8"], "needs --global-batch"),
    (["plan", "--layers", "4", "--hidden", "512", "--gpus", "8", "--global-batch", "8"], "missing --heads --ffn"),
    (["plan", "--layers", "4", "--hidden", "500", "--heads", "3", "--ffn", "8", "--vocab", "8", "--seq", "8",
      "--gpus", "8", "--global-batch", "8"], "not a multiple of num_heads=3"),
    (["plan", "--model", "llama3-8b", "--gpus", "12", "--global-batch", "12"], "do not fill nodes of 8"),
    (BASE + ["--precision", "fp8", "--gpu", "a100"], "has no fp8 peak"),
    (["plan", "--config", "/no/such/plan.json", "--gpus", "8"], "No such file"),
])
def test_bad_input_is_one_clear_line(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("plait plan: error: ") and fragment in err, err
    assert "Traceback" not in err and err.count("\n") == 1


def test_console_script_prints_no_traceback() -> None:
    done = subprocess.run([sys.executable, "-m", "plait", "plan", "--model", "nope", "--gpus", "8",
                           "--global-batch", "8"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown model preset 'nope'" in done.stderr
    assert "Traceback" not in done.stderr


def test_search_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, *BASE, "--top", "3")
    assert code == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("#"))
    assert "tokens/s" in lines[header] and "mem GB" in lines[header]
    assert [line.split()[0] for line in lines[header + 1:]] == ["1", "2", "3"]
    assert "Best for throughput" in out and "layouts in" in out


def test_json_search_output_parses(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, *BASE, "--json", "--top", "4", "--objective", "memory")
    assert code == 0
    data = json.loads(out)
    assert data["model"]["name"] == "llama3-8b" and data["hardware"]["num_gpus"] == 8
    layouts = data["plan"]["layouts"]
    assert len(layouts) == 4 and all(entry["fits"] for entry in layouts)
    memories = [entry["memory_gb"] for entry in layouts]
    assert memories == sorted(memories) and data["plan"]["objective"] == "memory"
    first = layouts[0]
    assert first["layout"]["dp"] * first["layout"]["pp"] * first["layout"]["tp"] == 8
    assert first["memory"]["total"] == pytest.approx(first["memory_gb"])


def test_fixed_layout_is_estimated_not_searched(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, *BASE, "--tp", "4", "--pp", "2", "--vpp", "2", "--microbatch-size", "2", "--json")
    assert code == 0
    est = json.loads(out)["estimate"]
    assert est["layout"] == {"dp": 1, "pp": 2, "tp": 4, "num_virtual": 2, "microbatch_size": 2,
                             "schedule": "interleaved", "recompute": None, "sequence_parallel": None}
    assert est["num_microbatches"] == 32 and est["step_time_s"] > 0 and 0 < est["mfu"] < 1
    assert sum(est["time"].values()) == pytest.approx(est["step_time_s"])


def test_explicit_dimensions_and_inference(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "plan", "--layers", "24", "--hidden", "2304", "--heads", "24", "--ffn", "9216",
                        "--vocab", "51200", "--seq", "2048", "--gpu", "a100", "--gpus", "8", "--global-batch", "64")
    assert code == 0 and "custom" in out
    code, out, _ = _run(capsys, "plan", "--model", "llama3-8b", "--gpus", "8", "--mode", "inference", "--batch",
                        "16", "--prompt-len", "1024", "--output-len", "128", "--objective", "latency")
    assert code == 0 and "TTFT ms" in out and "TPOT" in out


def test_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = {"model": {"preset": "llama3-8b", "seq_len": 4096}, "hardware": {"gpu": "a100-80gb", "gpus": 16},
              "job": {"global_batch": 128, "zero_stage": 2}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(config))
    code, out, _ = _run(capsys, "plan", "--config", str(path), "--json", "--top", "1")
    assert code == 0
    data = json.loads(out)
    assert data["model"]["seq_len"] == 4096 and data["job"]["zero_stage"] == 2
    assert data["hardware"]["gpu"]["name"] == "a100-80gb" and data["hardware"]["num_gpus"] == 16
    path.write_text(json.dumps({"model": "llama3-8b", "job": {"global_batch": 8, "zero": 1}}))
    code, _, err = _run(capsys, "plan", "--config", str(path), "--gpus", "8")
    assert code == 2 and "job: unknown field 'zero'; did you mean 'zero_stage'?" in err


def test_yaml_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text("model: llama3-8b\nhardware: {gpu: h100, gpus: 8}\njob: {global_batch: 32}\n")
    code, out, err = _run(capsys, "plan", "--config", str(path), "--top", "1")
    if importlib.util.find_spec("yaml") is None:
        assert code == 2 and "reading YAML needs PyYAML" in err
    else:
        assert code == 0 and "llama3-8b" in out


def test_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "plan.png"
    code, out, err = _run(capsys, *BASE, "--top", "3", "--plot", str(target))
    assert "Best for throughput" in out  # the table is printed either way
    if importlib.util.find_spec("matplotlib") is None:
        assert code == 1 and "--plot needs matplotlib" in err and not target.exists()
    else:
        assert code == 0 and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_reports_long_searches_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    from plait.plan.cli import _Progress

    quiet = _Progress(after_s=3600)
    quiet(50, 100)
    quiet.finish()
    assert capsys.readouterr().err == ""
    loud = _Progress(after_s=0)
    loud(50, 100)
    loud(100, 100)
    loud.finish()
    err = capsys.readouterr().err
    assert "searched 50 of 100 layouts" in err and "searched 100 of 100 layouts" in err and err.endswith("\n")
