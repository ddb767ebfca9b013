"""The cases of the [bad-input] report, one by one, and the top-level error handler of `plait`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from plait import cli
from plait.cli import main
from plait.plan.config import JobSpec, ModelSpec
from plait.plan.presets import hardware
from plait.plan.search import candidate_layouts, divisors

PLAN = ["plan", "--model", "llama3-8b", "--gpus", "8", "--global-batch", "64"]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,fragment", [
    (PLAN + ["--tp", "0"], "argument --tp: 0 is out of range: expected a whole number >= 1"),
    (["plan", "--model", "llama3-8b", "--gpus", "0", "--global-batch", "8"], "argument --gpus: 0 is out of range"),
    (PLAN + ["--top", "-3"], "argument --top: -3 is out of range"),
    (PLAN + ["--gpus", "2.5"], "expected a whole number >= 1 and <= 1,073,741,824, got '2.5'"),
    (PLAN + ["--gpus", str(10 ** 12)], "out of range"),
    (PLAN + ["--tp-overlap", "nan"], "expected a finite number >= 0 and <= 1"),
    (PLAN + ["--memory-margin", "1"], "expected a finite number >= 0 and < 1"),
    (PLAN + ["--latency-target-ms", "0"], "expected a finite number > 0"),
    (["bench", "pipeline", "--world", "0"], "argument --world: 0 is out of range"),
    (["bench", "train", "--layouts", "2,x,1"], "argument --layouts"),
    (["bench", "train", "--bucket-mb", "-1"], "argument --bucket-mb"),
    (["bench", "tp_layers", "--tp", "3", "--tokens", "512", "--no-save"], "must be divisible by TP 3"),
])
def test_bad_option_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str], argv: list[str],
                                             fragment: str) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert fragment in err.splitlines()[-1] and "Traceback" not in err


def test_a_billion_gpus_is_bounded_work(capsys: pytest.CaptureFixture[str]) -> None:
    assert divisors(10 ** 9) == sorted(2 ** a * 5 ** b for a in range(10) for b in range(10))
    assert divisors(10 ** 9, limit=8) == [1, 2, 4, 5, 8] and divisors(97) == [1, 97]
    code, out, err = _run(capsys, "plan", "--model", "llama3-8b", "--gpus", str(2 ** 30), "--global-batch",
                          str(2 ** 30), "--top", "1")
    assert code == 0 and "1073741824 x h100" in out


def test_searches_are_capped() -> None:
    model = ModelSpec("wide", num_layers=720720, hidden=5040, num_heads=5040, ffn_hidden=5040, vocab_size=8,
                      seq_len=8)
    cluster = hardware("h100", 720720 * 8)
    with pytest.raises(ValueError, match="more than 1,000 layouts"):
        candidate_layouts(model, cluster, JobSpec(global_batch=720720 * 8), allow_uneven=True, limit=1000)


def test_config_fields_are_typed_and_unknown_keys_get_the_closest_name(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job.json"
    cases = [({"model": {"preset": "llama3-8b", "num_layers": "32"}, "job": {"global_batch": 8}},
              "model: num_layers must be a whole number, got '32'"),
             ({"modle": "llama3-8b"}, "unknown section 'modle'; did you mean 'model'?"),
             ({"model": {"num_layer": 4}}, "model: unknown field 'num_layer'; did you mean 'num_layers'?"),
             ({"model": {"num_layers": 4}}, "model: missing field(s) hidden, num_heads"),
             ({"hardware": {"gpu": "h100", "gpus": 8, "gpus_per_nod": 4}}, "did you mean 'gpus_per_node'?"),
             ({"hardware": {"gpu": "h100", "gpus": True}}, "gpus must be a whole number, got True"),
             ({"job": {"global_batch": 8, "tp_overlap": None}}, "tp_overlap must be a number, got None"),
             ({"job": [1, 2]}, "job: expected a mapping of fields, got list")]
    for document, fragment in cases:
        path.write_text(json.dumps(document))
        code, _, err = _run(capsys, "plan", "--config", str(path), "--gpus", "8")
        assert code == 2 and str(path) in err and fragment in err, (fragment, err)
    path.write_text("")
    code, _, err = _run(capsys, "plan", "--config", str(path), "--gpus", "8")
    assert code == 2 and "the file is empty" in err


def test_measured_file_with_a_missing_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gemm.json"
    path.write_text(json.dumps({"results": {"gemm_efficiency": [{"m": 4096, "n": 4096, "efficiency": 0.7}]}}))
    code, _, err = _run(capsys, *PLAN, "--measured", str(path))
    assert code == 2 and f"{path}: gemm_efficiency entry" in err and "lacks ['k']" in err


# ------------------------------------------------------------------------------- the handler itself
def _fake_command(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    def setup(parser: argparse.ArgumentParser) -> None:
        def run(args: argparse.Namespace) -> int:
            raise error
        parser.set_defaults(run=run)

    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", ("a subcommand that fails", setup))


def test_every_subcommand_gets_one_line_and_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("PLAIT_DEBUG", raising=False)
    _fake_command(monkeypatch, OSError(2, "No such file or directory"))
    code, _, err = _run(capsys, "fake")
    assert code == 2 and err == "plait fake: error: [Errno 2] No such file or directory\n"
    for argv, env in ((["--debug", "fake"], None), (["fake", "--debug"], None), (["fake"], "1")):
        if env:
            monkeypatch.setenv("PLAIT_DEBUG", env)
        code, _, err = _run(capsys, *argv)
        assert code == 2 and err.startswith("Traceback") and err.endswith("plait fake: error: [Errno 2] "
                                                                          "No such file or directory\n")
    monkeypatch.delenv("PLAIT_DEBUG")
    _fake_command(monkeypatch, KeyError("oops"))     # a bug, not bad input: still one line
    code, _, err = _run(capsys, "fake")
    assert code == 2 and err == ("plait fake: internal error (KeyError): 'oops'; rerun with --debug for the "
                                 "traceback\n")
    _fake_command(monkeypatch, ValueError("first line\ngrid line 1\ngrid line 2"))
    code, _, err = _run(capsys, "fake")
    assert err == "plait fake: error: first line (and 2 more lines: rerun with --debug)\n"


def test_rank_failures_are_summarised_per_rank(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from plait.launch import RanksFailed

    failure = RanksFailed("bench_rank failed on ranks [0, 1]\n--- rank 0 ---\nTraceback (most recent call last):\n"
                          "  File x\nValueError: bad hidden\n\n--- rank 1 ---\nTraceback ...\nCommError: peer gone\n")
    _fake_command(monkeypatch, failure)
    code, _, err = _run(capsys, "fake")
    assert code == 2 and err == ("plait fake: error: bench_rank failed on ranks [0, 1]; rank 0: ValueError: bad "
                                 "hidden; rank 1: CommError: peer gone\n")


def test_help_and_usage_errors_return_their_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--help"]) == 0
    assert main(["no-such-command"]) == 2
    capsys.readouterr()


def test_timeouts_must_be_positive() -> None:
    from plait.comm import Communicator

    for bad in (-5, 0, float("nan"), float("inf"), "3"):
        with pytest.raises(ValueError, match="must be a finite number of seconds > 0"):
            Communicator.create("torch", None, timeout_s=bad)


def test_parse_schedule_needs_text(tmp_path: Path) -> None:
    from plait.pp import parse_schedule
    from plait.pp.schedule_io import load_schedule

    with pytest.raises(ValueError, match="parse_schedule takes the schedule's text"):
        parse_schedule(None)
    with pytest.raises(ValueError, match="cannot read the schedule file"):
        load_schedule(tmp_path / "none.txt")
    (tmp_path / "bad.txt").write_text("rank 0: 0F0 0Q1\n")
    with pytest.raises(ValueError, match=r"bad.txt: line 1: cannot read action '0Q1'"):
        load_schedule(tmp_path / "bad.txt")
