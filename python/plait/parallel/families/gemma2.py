"""The Gemma-2 family: Llama's TP plan with Gemma's model-level math around the layers.

Chosen as the family that proves the family abstraction (over Phi-3, whose differences are
fused projections, i.e. plan styles): Gemma-2 differs in what the model does *around* its
layers and in its attention, which is what a family module owns:

- embeddings scaled by ``sqrt(hidden_size)`` (rounded to float32, then to the model's dtype, as
  transformers' scaled embedding does); plait's vocab-parallel embedding does not scale, so the
  family does;
- attention logits soft-capped (``attn_logit_softcapping``) and every other layer windowed
  (``layer_types``/``sliding_window``), both passed by the attention module to plait's attention;
- ``query_pre_attn_scalar`` sets the attention scale (the module's ``scaling``);
- final logits soft-capped (``final_logit_softcapping``): ``cap * tanh(logits / cap)`` on each
  vocabulary shard, with the padding rows put back to ``-inf`` so they still never win.

transformers runs Gemma-2 with eager attention only (softmax in float32); plait's attention
does the softmax in float32 for 16-bit models and in float64 for float64 models, so float64
results agree with transformers to float32 rounding (about 1e-7), and exactly in float32.
"""
from __future__ import annotations

import torch

from ..plan import Plan
from .base import Field, refuse_if_true
from .llama import ROPE, RotaryDecoder, llama_plan


def _softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap


GEMMA2_FIELDS = (
    Field("vocab_size", "embedding and head split by rows over TP, padded to a multiple of tp"),
    Field("hidden_size", "the layers' own modules; the embedding scale sqrt(hidden_size)"),
    Field("intermediate_size", "MLP split by columns over TP (must divide by tp)"),
    Field("num_hidden_layers", "cut into pipeline stages"),
    Field("num_attention_heads", "whole query heads per TP rank (must divide by tp)"),
    Field("num_key_value_heads", "split over TP when tp divides them, else replicated on the ranks that read them"),
    Field("head_dim", "q/k/v rows split by whole heads of head_dim (differs from hidden/heads in Gemma-2)"),
    Field("hidden_activation", "the MLP module's own activation"),
    Field("rms_norm_eps", "the norm modules (Gemma's 1 + weight form)"),
    Field("max_position_embeddings", "context limit of plait serve/generate; rotary scaling reads it"),
    ROPE,
    Field("attention_bias", "q/k/v biases split with their rows, o bias added once after the all-reduce"),
    Field("attention_dropout", "layout-invariant dropout of the attention probabilities in training; off in eval"),
    Field("query_pre_attn_scalar", "attention scale query_pre_attn_scalar**-0.5 (the module's scaling)"),
    Field("attn_logit_softcapping", "cap * tanh(scores / cap) in plait's attention"),
    Field("final_logit_softcapping", "cap * tanh(logits / cap) on each vocabulary shard, padding kept at -inf"),
    Field("sliding_window", "window of the sliding layers, in the attention mask"),
    Field("layer_types", "per-layer full or sliding attention, read by each attention module"),
    Field("tie_word_embeddings", "one shared tensor for the embedding and the head (summed gradients over PP)"),
    Field("use_bidirectional_attention", "attention without the causal mask (embedding models)",
          refuse_if_true("bidirectional attention is for embedding models; plait runs causal LMs")),
    Field("dtype", "default dtype of from_pretrained when none is given"),
)


class Gemma2Family(RotaryDecoder):
    name = "gemma2"
    model_types = ("gemma2",)
    fields = GEMMA2_FIELDS

    def shipped_plan(self, model_type: str) -> Plan:
        return llama_plan("gemma2", family="gemma2")

    def embed(self, stage, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = stage.part("embed")(ids)
        scale = torch.tensor(stage.hf_config.hidden_size ** 0.5, dtype=torch.float32)
        return h * scale.to(device=h.device, dtype=h.dtype)

    def head(self, stage, h: torch.Tensor) -> torch.Tensor:
        head = stage.part("head")
        logits = head(stage.part("norm")(h))
        cap = stage.hf_config.final_logit_softcapping
        if cap is None:
            return logits
        return head.mask_padding(_softcap(logits, cap))
