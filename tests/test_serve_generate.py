"""``plait generate`` end to end: local processes, tokenizer text, JSON, and bad input refused up front."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from serve_models import reference_greedy, save_model

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def _plait(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "plait", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model("llama", tmp_path_factory.mktemp("gen") / "llama", seed=3)


def test_generate_text_prompt_on_tp2_matches_transformers(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = "the cat sat on"
    out = _plait("generate", "--model", model_dir, "--tp", "2", "--prompt", prompt, "--max-new-tokens", "6",
                 "--dtype", "float64", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ids = tokenizer(prompt)["input_ids"]
    assert result["prompt_ids"] == ids
    assert result["token_ids"] == reference_greedy(model_dir, ids, 6)
    assert result["text"] == tokenizer.decode(result["token_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("args,message", [
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["--prompt-ids", "1,99"], "must lie in [0, 37)"),
    (["--prompt-ids", ",".join(["2"] * 65)], "more than the context of 64"),
    (["--prompt-ids", "1", "--max-new-tokens", "0"], "positive integer"),
    (["--prompt-ids", "1", "--temperature", "-1"], "number >= 0"),
    (["--prompt-ids", "1", "--top-p", "1.5"], "(0, 1]"),
    (["--prompt-ids", "1", "--tp", "0"], "positive integer"),
    (["--prompt-ids", "1", "--tp", "3"], "not divisible by tp=3"),
    (["--prompt-ids", "1", "--max-len", "65"], "exceeds the model's context of 64"),
])
def test_generate_refuses_bad_input(model_dir, args, message, capsys):
    assert _main_exit_code(["generate", "--model", model_dir, *args]) == 2
    assert message in capsys.readouterr().err


def test_generate_refuses_missing_model(tmp_path, capsys):
    assert _main_exit_code(["generate", "--model", str(tmp_path / "nothing"), "--prompt-ids", "1"]) == 2
    assert "not a directory" in capsys.readouterr().err


def _main_exit_code(argv: list[str]) -> int:
    """plait's CLI in this process (bad input is refused before any rank starts): its exit code."""
    from plait.cli import main

    try:
        return main(argv)
    except SystemExit as exit_:      # argparse's own refusals
        return exit_.code


def test_generate_under_torchrun(model_dir):
    """Under torchrun each process is one rank; only rank 0 prints."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "plait",
                          "generate", "--model", model_dir, "--tp", "2", "--prompt-ids", "2,5,7,9",
                          "--max-new-tokens", "6", "--dtype", "float64", "--json"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    assert json.loads(lines[0])["token_ids"] == reference_greedy(model_dir, [2, 5, 7, 9], 6)


@pytest.mark.parametrize("capabilities,want", [
    ({"amx_bf16": True, "avx512_bf16": True}, ("bfloat16", "auto: the CPU has AMX-BF16")),
    ({"amx_bf16": False, "avx512_bf16": True}, ("bfloat16", "auto: the CPU has AVX512-BF16")),
    ({"amx_bf16": False, "avx512_bf16": False, "avx2": True}, ("float32", "auto: the CPU has neither AMX-BF16 nor "
                                                                          "AVX512-BF16")),
])
def test_auto_dtype_follows_the_cpu(monkeypatch, capabilities, want):
    import torch

    from plait.serve.options import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    assert resolve_dtype("auto") == want
    assert resolve_dtype("float64") == ("float64", "as asked")


def test_generate_with_the_auto_dtype_runs(model_dir):
    out = _plait("generate", "--model", model_dir, "--prompt-ids", "2,5,7,9", "--max-new-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout.strip().splitlines()[-1])["token_ids"]) >= 1
