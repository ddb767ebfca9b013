"""The Llama family: Llama (1-3), Mistral, Qwen2, Qwen3, and Llama-like decoders run with a plan passed in.

Layers take hidden states plus rotary tables (``position_embeddings``) computed once per stage
by the model's rotary module; q/k/v are column-parallel by heads (KV heads replicated when
tp exceeds them), o row-parallel; gate/up column-parallel, down row-parallel.

Rotary types whose tables depend on the longest position of the call (``dynamic``,
``longrope``) are computed as transformers computes them for one request from a fresh model:
per token, with the sequence length transformers' generate sees for it (the whole prompt's
while prefilling, position + 1 after), from the module's initial state, so a token's tables
never depend on which other requests share its batch, how its prompt was chunked, or what ran
before it.
"""
from __future__ import annotations

import fnmatch
from typing import Optional

import torch
from torch import nn

from ..plan import Plan
from .base import Field, HFDecoder

STATEFUL_ROPE = ("dynamic", "longrope")


def llama_plan(name: str = "llama", root: str = "model", family: str = "llama") -> Plan:
    """Llama, Mistral, Qwen2 (QKV bias), Qwen3: q/k/v column by heads, o row; gate/up column, down row."""
    layer = f"{root}.layers.*"
    return Plan(
        name=name, family=family,
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


def _fresh_state(rotary: nn.Module) -> dict:
    return {"inv_freq": rotary.inv_freq.clone(), "max_seq_len_cached": getattr(rotary, "max_seq_len_cached", None),
            "attention_scaling": getattr(rotary, "attention_scaling", None)}


def rotary_tables(rotary: nn.Module, h: torch.Tensor, positions: torch.Tensor,
                  lengths: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[batch, seq, head_dim]`` of ``positions`` ``[batch or 1, seq]`` (see the module docstring).

    For the stateful types the tables of a token depend on the length of the sequence it is computed with:
    ``lengths`` ``[batch, seq]`` gives it per token (serving: the larger of the request's prompt length and
    the token's position + 1, which is what transformers' generate uses, prompt tokens sharing the whole
    prompt's tables); None: each row is one whole sequence (its last position + 1). Lengths that give the same
    tables share one call of the module (:func:`_length_classes`)."""
    if getattr(rotary, "rope_type", None) not in STATEFUL_ROPE:
        return rotary(h, positions)
    fresh = rotary.__dict__.get("_plait_fresh_state")
    if fresh is None:                                      # before the first call can change the module
        fresh = rotary.__dict__["_plait_fresh_state"] = _fresh_state(rotary)
    if lengths is None:
        lengths = (positions.amax(dim=1, keepdim=True) + 1).expand_as(positions)
    positions = positions.expand_as(lengths)
    flat_positions = positions.reshape(-1)
    flat_lengths = _length_classes(rotary, fresh, lengths.reshape(-1))
    long_from = _longrope_original(rotary) + 1 if rotary.rope_type == "longrope" else None
    cos = sin = None
    for length in torch.unique(flat_lengths).tolist():
        where = (flat_lengths == length).nonzero().flatten()
        rotary.inv_freq = fresh["inv_freq"].clone()        # each length from the module's initial state
        for attr in ("max_seq_len_cached", "attention_scaling"):
            if fresh[attr] is not None:
                setattr(rotary, attr, fresh[attr])
        # The module takes the sequence length from the largest position it is given: append length - 1. A real
        # token lies below its length (longrope's long class aside, where any length past the original is
        # alike); a padding token may not, and its tables are never read: keep it below too.
        ps = flat_positions[where]
        if length != long_from:
            ps = ps.clamp(max=length - 1)
        call = torch.cat([ps, flat_positions.new_tensor([length - 1])]).unsqueeze(0)
        c, s_ = rotary(h, call)
        if cos is None:
            cos = c.new_empty(flat_positions.numel(), c.shape[-1])
            sin = s_.new_empty(flat_positions.numel(), s_.shape[-1])
        cos[where], sin[where] = c[0, :-1], s_[0, :-1]
    return cos.view(*positions.shape, -1), sin.view(*positions.shape, -1)


def _length_classes(rotary: nn.Module, fresh: dict, lengths: torch.Tensor) -> torch.Tensor:
    """One representative per class of sequence lengths whose tables are equal (transformers' update rules):
    longrope has two (up to ``original_max_position_embeddings``: short factors; past it: long ones); dynamic
    keeps the module's initial tables up to its cached length and rescales per length past it."""
    if rotary.rope_type == "longrope":
        original = _longrope_original(rotary)
        return torch.where(lengths > original, original + 1, original)
    return lengths.clamp(min=fresh["max_seq_len_cached"])


def _longrope_original(rotary: nn.Module) -> int:
    """The length up to which longrope uses its short factors (transformers reads it from rope_parameters)."""
    config = rotary.config
    return int(rope_params(config).get("original_max_position_embeddings", config.max_position_embeddings))


def rope_params(config) -> dict:
    """The config's rotary parameters (transformers 5: ``rope_parameters``; older: ``rope_scaling``), or {}."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    return params if isinstance(params, dict) else {}


def rope_type(config) -> str:
    """The config's rotary type."""
    params = rope_params(config)
    return params.get("rope_type", params.get("type", "default"))


def stateful_rope_refusal(config) -> Optional[str]:
    """A prefix's keys depend on the whole prompt's length under the stateful rotary types: not shareable."""
    kind = rope_type(config)
    if kind in STATEFUL_ROPE:
        return (f"rope type {kind!r} rotates a prompt's keys by tables that depend on the whole prompt's length, "
                f"so equal prefixes of prompts of different lengths differ")
    return None


def rotary_kwargs(stage, h: torch.Tensor, positions: torch.Tensor, step) -> dict:
    """Decoder-layer keyword arguments of a family whose layers take rotary tables from the stage's rotary module
    (a serving ``step`` gives each token's sequence length, :attr:`plait.serve.forward.CachedStep.rope_lengths`)."""
    return {"attention_mask": None, "position_ids": positions,
            "position_embeddings": rotary_tables(stage.part("rotary"), h, positions,
                                                 None if step is None else step.rope_lengths)}


ROPE = Field("rope_parameters", "the model's rotary module computes the tables (default, linear, dynamic, yarn, "
                                "longrope, llama3); dynamic and longrope per token with the sequence length "
                                "transformers' generate uses (no prefix caching for them)")
LLAMA_FIELDS = (
    Field("vocab_size", "embedding and head split by rows over TP, padded to a multiple of tp"),
    Field("hidden_size", "the layers' own modules"),
    Field("intermediate_size", "MLP split by columns over TP (must divide by tp)"),
    Field("num_hidden_layers", "cut into pipeline stages"),
    Field("num_attention_heads", "whole query heads per TP rank (must divide by tp)"),
    Field("num_key_value_heads", "split over TP when tp divides them, else replicated on the ranks that read them"),
    Field("head_dim", "q/k/v rows split by whole heads of head_dim (may differ from hidden/heads)"),
    Field("hidden_act", "the MLP module's own activation"),
    Field("rms_norm_eps", "the norm modules"),
    Field("max_position_embeddings", "context limit of plait serve/generate (times the factor for dynamic rotary "
                                     "scaling, as vLLM); rotary scaling reads it"),
    ROPE,
    Field("attention_bias", "q/k/v biases split with their rows, o bias added once after the all-reduce"),
    Field("mlp_bias", "gate/up biases split with their rows, down bias added once after the all-reduce"),
    Field("attention_dropout", "layout-invariant dropout of the attention probabilities in training; off in eval"),
    Field("tie_word_embeddings", "one shared tensor for the embedding and the head (summed gradients over PP)"),
    Field("pretraining_tp", "not read by transformers 5 (no effect on the math), so none in plait either"),
    Field("dtype", "default dtype of from_pretrained when none is given"),
    Field("sliding_window", "per-layer attention window in the mask (Mistral: every layer; Qwen: per layer_types)"),
    Field("use_sliding_window", "Qwen2/3: turns the window on (through layer_types)"),
    Field("max_window_layers", "Qwen2/3: which layers use the window (through layer_types)"),
    Field("layer_types", "per-layer full or sliding attention, read by each attention module"),
)


class RotaryDecoder(HFDecoder):
    """A decoder whose layers take rotary tables from the stage's rotary module (abstract: no plan of its own)."""

    def layer_kwargs(self, stage, h: torch.Tensor, positions: torch.Tensor, step) -> dict:
        return rotary_kwargs(stage, h, positions, step)

    def prefix_cache_refusal(self, config) -> Optional[str]:
        return stateful_rope_refusal(config)


class LlamaFamily(RotaryDecoder):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    fields = LLAMA_FIELDS

    def shipped_plan(self, model_type: str) -> Plan:
        return llama_plan(model_type)
