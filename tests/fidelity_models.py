"""Tiny checkpoints of every supported family with their config fields as real checkpoints ship them.

Each variant is a transformers config class at its *default* values (GPT-2's dropouts are 0.1,
Gemma-2's soft-caps and alternating windows are on) with only the sizes shrunk, plus the fields
the fidelity issue names set to non-default values: rotary scaling of every kind, biases,
``head_dim`` different from hidden/heads, windows, tied and untied heads, attention scaling
fields. Weights are drawn lively (std 0.3, ``hf_models.liven``) so greedy decoding walks
through many tokens and a wrong field shows. Saved in float64 unless the variant says otherwise.
"""
from __future__ import annotations

import torch

from hf_models import VOCAB, liven
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4)


def _llama(**fields):
    import transformers as T

    return T.LlamaConfig(**{**TINY, "num_key_value_heads": 2, "max_position_embeddings": 64, **fields})


def variant_config(name: str):
    import transformers as T

    rope = {"rope_theta": 10000.0}
    if name == "gpt2":                      # every dropout at its shipped 0.1, tied head
        return T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64)
    if name == "gpt2_scaled":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64, n_inner=40,
                            scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True,
                            activation_function="gelu")
    if name == "llama_llama3":              # llama3 rotary, QKV/o and MLP biases, head_dim != hidden/heads, tied
        return _llama(head_dim=16, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                      attention_dropout=0.1,
                      rope_parameters={**rope, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if name == "llama_linear":
        return _llama(rope_parameters={**rope, "rope_type": "linear", "factor": 2.0})
    if name == "llama_dynamic":             # positions past max_position_embeddings rescale (logits only)
        return _llama(max_position_embeddings=8, rope_parameters={**rope, "rope_type": "dynamic", "factor": 2.0})
    if name == "llama_yarn":
        return _llama(rope_parameters={**rope, "rope_type": "yarn", "factor": 4.0,
                                       "original_max_position_embeddings": 16})
    if name == "llama_longrope":            # short factors up to 8 positions, long ones after
        return _llama(head_dim=8, rope_parameters={**rope, "rope_type": "longrope", "short_factor": [1.0] * 4,
                                                   "long_factor": [1.5, 2.0, 3.0, 4.0],
                                                   "original_max_position_embeddings": 8})
    if name == "mistral":                   # a window shorter than prompt + generation
        return T.MistralConfig(**TINY, num_key_value_heads=2, max_position_embeddings=64, sliding_window=5)
    if name == "qwen2_window":              # windowed layers from max_window_layers on, QKV bias, tied
        return T.Qwen2Config(**TINY, num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True,
                             sliding_window=5, max_window_layers=2, tie_word_embeddings=True,
                             attention_dropout=0.1)
    if name == "qwen3":                     # per-head q/k norms, head_dim != hidden/heads
        return T.Qwen3Config(**TINY, num_key_value_heads=2, max_position_embeddings=64, head_dim=16)
    if name == "gemma2":                    # embedding scale, soft-caps that bite, alternating windows
        return T.Gemma2Config(**TINY, num_key_value_heads=2, max_position_embeddings=64, head_dim=16,
                              query_pre_attn_scalar=16, sliding_window=5, attn_logit_softcapping=2.0,
                              final_logit_softcapping=3.0)
    raise ValueError(name)


# name -> (tolerance of logits against transformers in float64, logits sequence length)
VARIANTS = {
    "gpt2": (1e-10, 12), "gpt2_scaled": (1e-10, 12), "llama_llama3": (1e-10, 12), "llama_linear": (1e-10, 12),
    "llama_dynamic": (1e-10, 12), "llama_yarn": (1e-10, 12), "llama_longrope": (1e-10, 12),
    "mistral": (1e-10, 12), "qwen2_window": (1e-10, 12), "qwen3": (1e-10, 12),
    # transformers runs Gemma-2 with eager attention only, whose softmax is float32 (see families/gemma2.py)
    "gemma2": (1e-6, 12),
}


def save_variant(name: str, directory, seed: int = 0, dtype: torch.dtype = torch.float64,
                 max_shard_size=None) -> str:
    """Write variant ``name`` with lively random weights; ``max_shard_size`` splits it into several files."""
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(variant_config(name)).double()
    liven(model)
    model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(directory), **kwargs)
    return str(directory)


def reference(directory, dtype: torch.dtype = torch.float64):
    import transformers as T

    return T.AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype)


def reference_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generate (with its KV cache), never stopping early."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
