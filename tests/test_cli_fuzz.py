"""Property-based: whatever a user types or feeds it, `plait plan` / `plait bench` either succeed or
print one error line and exit with status 2; never a traceback, an "internal error" or a hang.

The CLI runs in-process (``plait.cli.main``); benchmarks stop at the point where they would
start their ranks (``run_ranks`` is replaced), so what is fuzzed is the checking, not the timing.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plait.cli import main

# PLAIT_FUZZ_EXAMPLES raises the number of cases for a longer hunt (the suite keeps it quick).
FUZZ = settings(max_examples=int(os.environ.get("PLAIT_FUZZ_EXAMPLES", "40")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# Values a careless user types for a number: fine ones, zero, negatives, floats, absurd sizes, words.
NUMBERS = st.one_of(
    st.integers(1, 64).map(str),
    st.integers(-(10 ** 12), 10 ** 12).map(str),
    st.sampled_from(["0", "-1", "-3", "1.5", "2.0", "1e3", "nan", "inf", "-inf", "", " ", "x", "0x10", "1_000",
                     "1000000000", str(10 ** 30), "9" * 5000]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
PLAN_NUMERIC = ["--layers", "--hidden", "--heads", "--kv-heads", "--ffn", "--vocab", "--seq", "--gpus",
                "--gpus-per-node", "--global-batch", "--zero", "--tp-overlap", "--memory-margin", "--batch",
                "--prompt-len", "--output-len", "--latency-target-ms", "--dp", "--pp", "--tp", "--vpp",
                "--microbatch-size", "--top"]
PLAN_CHOICES = {"--mode": ["train", "inference", "serve"], "--precision": ["bf16", "fp8", "fp4"],
                "--recompute": ["auto", "full", "some"], "--schedule": ["1f1b", "interleaved", "zb-h1", "2f2b"],
                "--objective": ["throughput", "memory", "speed"], "--model": ["llama3-8b", "gpt-1.7b", "nope"],
                "--gpu": ["h100", "a100", "b300"]}


def check_outcome(code: int, out: str, err: str) -> None:
    """Success (0, output on stdout) or exactly one error line on stderr, its last line, and status 2."""
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 0:
        assert out.strip(), "success without output"
        return
    assert code == 2, (code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], err


def run_cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@FUZZ
@given(options=st.dictionaries(st.sampled_from(PLAN_NUMERIC), NUMBERS, max_size=4),
       choices=st.dictionaries(st.sampled_from(sorted(PLAN_CHOICES)), st.integers(0, 2), max_size=2))
def test_plan_options(capsys: pytest.CaptureFixture[str], options: dict[str, str], choices: dict[str, int]) -> None:
    argv = ["plan", "--model", "gpt-1.7b", "--gpus", "8", "--global-batch", "32"]
    for flag, value in options.items():
        argv += [f"{flag}={value}"]          # "=": a value may start with "-"
    for flag, index in choices.items():
        argv += [flag, PLAN_CHOICES[flag][index]]
    check_outcome(*run_cli(capsys, argv))


class Launched(BaseException):
    """Raised instead of starting ranks: the benchmark accepted its arguments."""


BENCH_OPTIONS = {
    "pipeline": ["--world", "--microbatches", "--hidden", "--rows", "--blocks", "--warmup", "--timeline-steps",
                 "--iters"],
    "tp_layers": ["--tp", "--tokens", "--hidden", "--warmup", "--iters"],
    "train": ["--steps", "--layers", "--hidden", "--seq", "--global-batch", "--microbatches", "--bucket-mb",
              "--layouts"],
    "check_calls": ["--world", "--sizes", "--trials"],
    "comm_gpu": ["--world", "--min-kb", "--max-mb", "--warmup", "--iters"],
}


@FUZZ
@given(data=st.data())
def test_bench_options(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, data) -> None:
    name = data.draw(st.sampled_from(sorted(BENCH_OPTIONS)))
    module = importlib.import_module(f"plait.bench.{name}")

    def launch(*args, **kwargs):
        raise Launched

    monkeypatch.setattr(module, "run_ranks", launch)
    options = data.draw(st.dictionaries(st.sampled_from(BENCH_OPTIONS[name]), NUMBERS, max_size=3))
    argv = ["bench", name, "--no-save"] + [f"{flag}={value}" for flag, value in options.items()]
    try:
        code, out, err = run_cli(capsys, argv)
    except Launched:
        return
    check_outcome(code, out, err)


# ------------------------------------------------------------------------------------------- files
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10 ** 6, 10 ** 12), st.floats(allow_nan=False),
              st.sampled_from(["llama3-8b", "h100", "32", "train", "swiglu", "", "bf16"])),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.sampled_from(
                                   ["model", "hardware", "job", "preset", "gpu", "gpus", "num_layers", "hidden",
                                    "num_heads", "ffn_hidden", "vocab_size", "seq_len", "global_batch", "mode",
                                    "zero_stage", "zero", "modle", "name", "memory_gb", "peak_tflops"]),
                                   children, max_size=4)),
    max_leaves=12)

VALID_CONFIG = {"model": {"preset": "gpt-1.7b", "seq_len": 1024},
                "hardware": {"gpu": "a100-80gb", "gpus": 8},
                "job": {"global_batch": 16, "zero_stage": 1}}


def _mutations(document: dict) -> st.SearchStrategy:
    """`document` with one field replaced, removed, or a key misspelt."""
    paths = [(section, key) for section, body in document.items() for key in body]

    def mutate(choice: tuple[int, int, object]) -> dict:
        which, how, value = choice
        section, key = paths[which % len(paths)]
        copy = json.loads(json.dumps(document))
        if how == 0:
            copy[section][key] = value
        elif how == 1:
            del copy[section][key]
        else:
            copy[section][key + "s"] = copy[section].pop(key)
        return copy

    return st.tuples(st.integers(0, 100), st.integers(0, 2), JSON_VALUES).map(mutate)


@FUZZ
@given(document=st.one_of(JSON_VALUES, _mutations(VALID_CONFIG)), suffix=st.sampled_from([".json", ".yaml"]))
def test_plan_config_files(capsys: pytest.CaptureFixture[str], tmp_path: Path, document, suffix: str) -> None:
    path = tmp_path / f"job{suffix}"
    path.write_text(json.dumps(document))
    check_outcome(*run_cli(capsys, ["plan", "--config", str(path), "--top", "2"]))


@FUZZ
@given(raw=st.one_of(st.binary(max_size=64), st.text(max_size=64)))
def test_plan_config_bytes(capsys: pytest.CaptureFixture[str], tmp_path: Path, raw) -> None:
    path = tmp_path / "job.json"
    path.write_bytes(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass"))
    check_outcome(*run_cli(capsys, ["plan", "--config", str(path), "--gpus", "8"]))


MEASURED_ROWS = st.lists(st.one_of(
    st.fixed_dictionaries({"m": st.integers(-4, 8192), "n": st.integers(1, 8192), "k": st.integers(1, 8192)},
                          optional={"efficiency": st.floats(-1, 2), "tflops": JSON_VALUES}),
    JSON_VALUES), max_size=3)


@FUZZ
@given(document=st.one_of(JSON_VALUES, MEASURED_ROWS.map(lambda rows: {"results": {"gemm_efficiency": rows}})))
def test_plan_measured_files(capsys: pytest.CaptureFixture[str], tmp_path: Path, document) -> None:
    path = tmp_path / "gemm.json"
    path.write_text(json.dumps(document))
    check_outcome(*run_cli(capsys, ["plan", "--model", "gpt-1.7b", "--gpus", "8", "--global-batch", "16",
                                    "--measured", str(path), "--top", "1"]))


ACTIONS = st.sampled_from(["0F0", "0B0", "1F0", "1B0", "0W0", "0SEND_F0", "1RECV_F0", "0F1", "9F9", "F", "0X0",
                           "rank 0:", "rank 1:", "rank 7:", "microbatches: 2", "microbatches: -1",
                           "placement: 0 1", "placement: x", "name: z", "#", ",", "\n", "\n", "\n"])


@FUZZ
@given(text=st.one_of(st.lists(ACTIONS, max_size=14).map(" ".join), st.text(max_size=40)))
def test_schedule_text(tmp_path: Path, text: str) -> None:
    """A schedule file is a Schedule (which validates or not) or a ValueError naming the file."""
    from plait.pp.schedule_io import load_schedule

    path = tmp_path / "schedule.txt"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        schedule = load_schedule(path)
    except ValueError as exc:
        assert str(path) in str(exc)
        return
    try:
        schedule.validate()
    except ValueError:
        pass
