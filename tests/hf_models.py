"""Tiny transformers models with random weights, built from config classes (nothing is downloaded).

``FAMILIES`` names each test model; ``save_tiny(kind, directory, seed)`` writes it as a
transformers checkpoint (float64 safetensors). The vocabulary, 37, is prime, so no tp > 1
divides it: every layout exercises vocabulary padding.
"""
from __future__ import annotations

import torch

VOCAB = 37


def tiny_config(kind: str):
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=64)
    if kind == "llama":            # GQA, untied
        return T.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if kind == "llama_mqa":        # one KV head: replicated on every rank at tp > 1, tied
        return T.LlamaConfig(num_key_value_heads=1, tie_word_embeddings=True, **common)
    if kind == "qwen2":            # QKV bias, tied
        return T.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common)
    if kind == "mistral":
        return T.MistralConfig(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=6, **common)
    if kind == "gpt2":             # Conv1D, fused c_attn, learned positions, tied
        return T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    raise ValueError(kind)


FAMILIES = ("llama", "llama_mqa", "qwen2", "mistral", "gpt2")


def save_tiny(kind: str, directory, seed: int = 0) -> None:
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(kind)).double()
    with torch.no_grad():     # non-trivial norms and biases, so a wrong shard of them shows
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(str(directory))


def liven(model) -> None:
    """Lively random weights (std 0.3; transformers' 0.02 makes a tiny random model repeat one token) and
    non-trivial norms and biases, so greedy decoding walks through many tokens and a wrong field shows."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
            else:
                param.add_(torch.randn_like(param) * 0.1)


def load_reference(directory):
    import transformers as T

    return T.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float64)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()
