"""Plans that ship with plait, and the translation of a transformers config's own TP plan.

``for_model(model)`` picks, in order: plait's plan for the model's architecture
(``config.model_type``), else a plan translated from the config's ``base_model_tp_plan``
(when the model is a Llama-like decoder: ``base_model_pp_plan`` and a rotary embedding),
else a ValueError listing what is supported and how to pass a plan by hand.
"""
from __future__ import annotations

import fnmatch
from typing import Callable

from torch import nn

from .plan import Plan


def llama_plan(name: str = "llama", root: str = "model") -> Plan:
    """Llama, Mistral, Qwen2 (QKV bias), Qwen3: q/k/v column by heads, o row; gate/up column, down row."""
    layer = f"{root}.layers.*"
    return Plan(
        name=name, family="llama",
        styles={
            f"{root}.embed_tokens": "vocab_embed",
            "lm_head": "vocab_head",
            f"{layer}.self_attn": "attention",
            f"{layer}.self_attn.q_proj": "colwise_q",
            f"{layer}.self_attn.k_proj": "colwise_kv",
            f"{layer}.self_attn.v_proj": "colwise_kv",
            f"{layer}.self_attn.o_proj": "rowwise",
            f"{layer}.mlp.gate_proj": "colwise",
            f"{layer}.mlp.up_proj": "colwise",
            f"{layer}.mlp.down_proj": "rowwise",
        },
        embed=f"{root}.embed_tokens", layers=f"{root}.layers", norm=f"{root}.norm", head="lm_head",
        rotary=f"{root}.rotary_emb", tied=True,
        notes="KV heads are replicated when tp exceeds num_key_value_heads")


def gpt2_plan() -> Plan:
    """GPT-2: Conv1D weights ([in, out]); c_attn is a fused q|k|v projection split per part by heads."""
    layer = "transformer.h.*"
    return Plan(
        name="gpt2", family="gpt2",
        styles={
            "transformer.wte": "vocab_embed",
            "lm_head": "vocab_head",
            f"{layer}.attn": "attention",
            f"{layer}.attn.c_attn": "colwise_qkv",
            f"{layer}.attn.c_proj": "rowwise",
            f"{layer}.mlp.c_fc": "colwise",
            f"{layer}.mlp.c_proj": "rowwise",
        },
        embed="transformer.wte", positions="transformer.wpe", layers="transformer.h", norm="transformer.ln_f",
        head="lm_head", tied=True)


PLANS: dict[str, Callable[[], Plan]] = {
    "llama": lambda: llama_plan("llama"),
    "mistral": lambda: llama_plan("mistral"),
    "qwen2": lambda: llama_plan("qwen2"),
    "qwen3": lambda: llama_plan("qwen3"),
    "gpt2": gpt2_plan,
}

# transformers' TP styles -> plait's; a colwise k/v projection becomes colwise_kv (see translate_hf_plan).
_HF_STYLES = {"colwise": "colwise", "rowwise": "rowwise", "colwise_rep": "colwise", "rowwise_rep": "rowwise",
              "replicated_with_grad_allreduce": "replicate", "sequence_parallel": "replicate",
              "colwise_gather_output": "vocab_head", "replicate": "replicate"}


def translate_hf_plan(model: nn.Module) -> Plan:
    """A plan from the model config's ``base_model_tp_plan`` and ``base_model_pp_plan`` (Llama-like decoders)."""
    config = getattr(model, "config", None)
    tp_plan = getattr(config, "base_model_tp_plan", None)
    pp_plan = getattr(config, "base_model_pp_plan", None)
    prefix = getattr(model, "base_model_prefix", "model")
    if not tp_plan or not pp_plan or not hasattr(getattr(model, prefix, None), "rotary_emb"):
        raise ValueError("no translatable transformers TP plan")
    heads = getattr(config, "num_attention_heads")
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    styles: dict[str, str] = {f"{prefix}.embed_tokens": "vocab_embed", "lm_head": "vocab_head"}
    modules = dict(model.named_modules())
    for pattern, hf_style in tp_plan.items():
        if hf_style not in _HF_STYLES:
            raise ValueError(f"transformers TP style {hf_style!r} (for {pattern!r}) has no plait equivalent; "
                             f"known: {sorted(_HF_STYLES)}")
        full = f"{prefix}.{pattern}"
        style = _HF_STYLES[hf_style]
        example = next((m for n, m in modules.items() if fnmatch.fnmatchcase(n, full)), None)
        if style == "colwise" and isinstance(example, nn.Linear) and example.out_features == kv * head_dim \
                and kv != heads:
            style = "colwise_kv"
        if style == "colwise" and pattern.endswith("q_proj"):
            style = "colwise_q"
        styles[full] = style
        if pattern.endswith(".q_proj"):
            styles[full.rsplit(".", 1)[0]] = "attention"
    return Plan(name=f"{config.model_type} (from transformers' base_model_tp_plan)", family="llama",
                styles=styles, embed=f"{prefix}.embed_tokens", layers=f"{prefix}.layers", norm=f"{prefix}.norm",
                head="lm_head", rotary=f"{prefix}.rotary_emb", tied=True)


def for_model(model: nn.Module) -> Plan:
    """The plan for ``model``: plait's own for known architectures, else a translated transformers plan."""
    plait_plan = getattr(model, "plait_plan", None)
    if callable(plait_plan):
        return plait_plan()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in PLANS:
        return PLANS[model_type]()
    try:
        return translate_hf_plan(model)
    except ValueError as err:
        reason = str(err)
    raise ValueError(
        f"no plan for {type(model).__name__} (model_type={model_type!r}): {reason}. plait ships plans for "
        f"{sorted(PLANS)} and plait's GPT, and translates transformers' base_model_tp_plan for Llama-like "
        f"decoders. Pass one by hand: plait.parallelize(model, mesh, plan=plait.plans.Plan(name=..., "
        f"family='llama', styles={{'model.layers.*.self_attn.q_proj': 'colwise_q', ...}}, embed=..., layers=..., "
        f"norm=..., head=...)); print(plait.plans.llama_plan()) shows a complete example")
