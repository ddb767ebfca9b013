"""Plans are plain data: they print, round-trip through JSON, are picked per architecture, and a bad
plan or a split that does not divide is a ValueError naming the module before any communication."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fresh_python import run_fresh
from hf_models import tiny_config
from plait.launch import run_ranks
from plait.parallel import HeadLayout, Plan, check_plan, for_model, gpt2_plan, llama_plan

transformers = pytest.importorskip("transformers")


def _model(kind: str, **overrides):
    config = tiny_config(kind)
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def test_plan_prints_and_round_trips_through_json():
    plan = llama_plan()
    assert "colwise_kv" in str(plan) and "model.layers.*.self_attn.k_proj" in str(plan)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    with pytest.raises(ValueError, match="unknown style"):
        Plan.from_dict({**plan.to_dict(), "styles": {"lm_head": "diagonal"}})
    with pytest.raises(ValueError, match="unknown keys"):
        Plan.from_dict({**plan.to_dict(), "layer": "x"})
    with pytest.raises(ValueError, match="not valid JSON"):
        Plan.from_json("{")


@pytest.mark.parametrize("kind,name", [("llama", "llama"), ("qwen2", "qwen2"), ("mistral", "mistral"),
                                       ("gpt2", "gpt2")])
def test_for_model_picks_the_shipped_plan(kind, name):
    model = _model(kind)
    plan = for_model(model)
    assert plan.name == name
    styles = check_plan(model, plan, 2)
    assert styles["lm_head"] == "vocab_head"


def test_transformers_tp_plan_is_translated():
    from plait.parallel import translate_hf_plan

    model = _model("llama")
    plan = translate_hf_plan(model)
    styles = check_plan(model, plan, 4)   # tp 4 > 2 KV heads: k/v become colwise_kv
    assert styles["model.layers.0.self_attn.k_proj"] == "colwise_kv"
    assert styles["model.layers.0.self_attn.q_proj"] == "colwise_q"
    assert styles["model.layers.0.mlp.down_proj"] == "rowwise"


def test_unknown_architecture_lists_the_supported_ones():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError) as info:
        for_model(Tiny())
    text = str(info.value)
    assert "llama" in text and "gpt2" in text and "plan=" in text


def test_bad_plans_and_splits_name_the_module_and_the_fix():
    model = _model("llama")
    plan = llama_plan()
    bad_pattern = Plan.from_dict({**plan.to_dict(), "styles": {**plan.styles, "model.layerz.*.mlp": "colwise"}})
    with pytest.raises(ValueError, match="match no module"):
        check_plan(model, bad_pattern, 2)
    wrong_type = Plan.from_dict({**plan.to_dict(), "styles": {**plan.styles, "model.norm": "colwise"}})
    with pytest.raises(ValueError, match="model.norm is a LlamaRMSNorm"):
        check_plan(model, wrong_type, 2)
    with pytest.raises(ValueError, match=r"num_heads=4 is not divisible by tp=3; .* \(1, 2, 4\)"):
        check_plan(model, plan, 3)
    odd_ffn = _model("llama", intermediate_size=50)
    with pytest.raises(ValueError, match=r"ffn_hidden=50 is not divisible by tp=4"):
        check_plan(odd_ffn, llama_plan(), 4)
    # a module the model's dimensions do not cover is checked on its own, by the same rule
    plain_head = Plan.from_dict({**plan.to_dict(), "styles": {**plan.styles, "lm_head": "colwise"}})
    with pytest.raises(ValueError, match=r"lm_head: out_features=37 is not divisible by tp=2"):
        check_plan(model, plain_head, 2)
    with pytest.raises(ValueError, match="too small"):
        check_plan(_model("gpt2", vocab_size=3), gpt2_plan(), 4)


def test_kv_heads_are_replicated_and_grouped_per_rank():
    # 8 query heads, 2 KV heads, tp 4: ranks 0,1 use KV head 0; ranks 2,3 KV head 1
    assert [HeadLayout(8, 2, 4, 4, r).kv_heads for r in range(4)] == [[0], [0], [1], [1]]
    assert HeadLayout(8, 2, 4, 4, 0).kv_groups == 2
    # tp divides the KV heads: a plain split
    assert [HeadLayout(8, 4, 4, 2, r).kv_heads for r in range(2)] == [[0, 1], [2, 3]]


def _bad_plan_on_ranks(rank: int, world: int) -> str:
    """parallelize with a non-dividing tp raises on every rank, and the group still works afterwards."""
    import plait

    mesh = plait.init_mesh(tp=world)
    model = _model("llama", num_attention_heads=3, num_key_value_heads=3, hidden_size=36)
    try:
        with pytest.raises(ValueError) as info:
            plait.parallelize(model, mesh)
        assert plait.current_mesh().tp_comm.all_reduce(torch.ones(1)).item() == world
        return str(info.value)
    finally:
        plait.destroy_mesh()


def test_parallelize_rejects_before_communicating():
    messages = run_ranks(_bad_plan_on_ranks, 2, timeout=120)
    assert all("num_heads=3 is not divisible by tp=2" in m for m in messages)


def test_import_plait_does_not_import_the_optional_extras():
    code = ("import sys, plait; plait.parallelize; plait.plans.for_model; plait.ParallelConfig; "
            "bad = [m for m in ('transformers', 'safetensors', 'tokenizers', 'fastapi', 'uvicorn') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    run_fresh(code)


def _different_models_on_ranks(rank: int, world: int) -> str:
    import plait

    mesh = plait.init_mesh(tp=world)
    model = _model("llama", intermediate_size=48 if rank == 0 else 64)
    try:
        with pytest.raises(ValueError) as info:
            plait.parallelize(model, mesh)
        return str(info.value)
    finally:
        plait.destroy_mesh()


def test_ranks_with_different_models_fail_alike():
    messages = run_ranks(_different_models_on_ranks, 2, timeout=120)
    assert all("ranks disagree on plait.parallelize" in m and "rank 1" in m for m in messages), messages
