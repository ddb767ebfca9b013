"""Rotary types whose tables depend on the sequence length (dynamic, longrope) under serving: each token's
tables as transformers' generate computes them for one request from a fresh model, in as few module calls as
there are distinct tables; the serving context and prefix caching follow from them."""
from __future__ import annotations

import warnings

import pytest
import torch

T = pytest.importorskip("transformers")

from fidelity_models import variant_config  # noqa: E402
from plait.launch import run_ranks  # noqa: E402


def _rotary(name: str):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(variant_config(name)).double()


def _one_sequence(name: str, position: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables of ``position`` in a sequence of ``length`` tokens, from a fresh module (transformers' own)."""
    cos, sin = _rotary(name)(torch.zeros(1, dtype=torch.float64), torch.arange(length)[None])
    return cos[0, position], sin[0, position]


@pytest.mark.parametrize("name,most_calls", [("llama_longrope", 2), ("llama_dynamic", 4)])
def test_tables_per_token_with_padding_in_few_calls(name, most_calls):
    from plait.parallel.families.llama import rotary_tables
    from plait.serve.forward import StepInputs

    # a 12-token prompt's last 5 (a chunk), a 5-token prompt's first 3 (padded), two decodes past 8 positions
    starts, lengths, prompts = torch.tensor([7, 0, 9, 13]), torch.tensor([5, 3, 1, 1]), torch.tensor([12, 5, 6, 4])
    inputs = StepInputs(torch.zeros(4, 1, dtype=torch.int64), starts, lengths, prompt_lens=prompts)
    rotary, calls = _rotary(name), []
    forward = rotary.forward
    rotary.forward = lambda x, p: calls.append(p) or forward(x, p)
    cos, sin = rotary_tables(rotary, torch.zeros(1, dtype=torch.float64), inputs.positions, inputs.rope_lengths)
    assert len(calls) <= most_calls, f"{len(calls)} module calls"
    for row in range(4):
        for offset in range(int(lengths[row])):
            position = int(starts[row]) + offset
            want_cos, want_sin = _one_sequence(name, position, max(int(prompts[row]), position + 1))
            assert torch.equal(cos[row, offset], want_cos) and torch.equal(sin[row, offset], want_sin), (row, offset)


def test_dynamic_context_is_scaled_and_prefix_caching_is_off():
    from plait.serve.worker import context_length

    assert context_length(variant_config("llama_dynamic")) == 16          # max_position_embeddings 8 x factor 2
    assert context_length(variant_config("llama_longrope")) == variant_config("llama_longrope").max_position_embeddings


def _engine_caching(rank: int, world: int, directory: str) -> tuple[bool, list[str]]:
    import plait
    from plait.serve.engine import Engine

    plait.init_mesh(tp=world)
    model = plait.from_pretrained(directory, plait.current_mesh(), dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = Engine(model, max_batch=1)
    plait.destroy_mesh()
    return engine.scheduler.pool.caching, [str(w.message) for w in caught]


def test_engine_turns_prefix_caching_off_for_stateful_rope(tmp_path):
    from fidelity_models import save_variant

    directory = save_variant("llama_longrope", tmp_path / "m")
    caching, said = run_ranks(_engine_caching, 1, directory, timeout=300)[0]
    assert not caching
    assert any("prefix caching is off" in s and "longrope" in s for s in said), said


def _translated(rank: int, world: int) -> float:
    import plait
    from plait.parallel import translate_hf_plan

    torch.manual_seed(0)
    config = T.GraniteConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2)   # multipliers at 1.0: Llama's math
    reference = T.AutoModelForCausalLM.from_config(config).double().eval()
    model = T.AutoModelForCausalLM.from_config(config).double()
    model.load_state_dict(reference.state_dict())
    plait.init_mesh(tp=world)
    parallel = plait.parallelize(model, plait.current_mesh(), plan=translate_hf_plan(model))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    err = (parallel.logits(ids) - reference(ids).logits).abs().max().item()
    plait.destroy_mesh()
    return err


def test_a_plan_passed_in_runs_a_model_type_no_family_owns():
    """Refused without a plan (tests/test_fidelity.py); with one, the caller's choice runs (unchecked)."""
    assert max(run_ranks(_translated, 2, timeout=300)) < 1e-12
