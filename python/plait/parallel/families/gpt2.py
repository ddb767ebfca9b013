"""The GPT-2 family: learned positions, Conv1D weights ``[in, out]``, a fused q|k|v projection, tied head.

transformers' ``GPT2Model.forward`` adds token and position embeddings and applies the embedding
dropout (``embd_pdrop``, the module ``transformer.drop``) before the blocks: the first stage does
the same here, with layout-invariant masks. The blocks' residual and MLP dropouts
(``resid_pdrop``) act on whole activations (after the row-parallel all-reduce) and become
layout-invariant dropouts; the attention dropout's probability (``attn_pdrop``) goes to plait's
attention function.
"""
from __future__ import annotations

import torch

from ..plan import Plan
from .base import Field, HFDecoder, refuse_if_true


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
        embed="transformer.wte", positions="transformer.wpe", embed_dropout="transformer.drop",
        layers="transformer.h", norm="transformer.ln_f", head="lm_head", tied=True)


GPT2_FIELDS = (
    Field("vocab_size", "embedding and head split by rows over TP, padded to a multiple of tp"),
    Field("n_embd", "the blocks' own modules"),
    Field("n_layer", "cut into pipeline stages"),
    Field("n_head", "whole heads per TP rank (must divide by tp); c_attn split per q, k, v part"),
    Field("n_inner", "MLP width, split by columns over TP (must divide by tp)"),
    Field("n_positions", "learned position table on the first stage; context limit of plait serve/generate"),
    Field("activation_function", "the MLP module's own activation"),
    Field("layer_norm_epsilon", "the LayerNorm modules"),
    Field("resid_pdrop", "layout-invariant dropout after attention and MLP in training; off in eval"),
    Field("embd_pdrop", "layout-invariant dropout of the embeddings (transformer.drop) in training; off in eval"),
    Field("attn_pdrop", "layout-invariant dropout of the attention probabilities in training; off in eval"),
    Field("scale_attn_weights", "the attention module's scaling, passed to plait's attention"),
    Field("scale_attn_by_inverse_layer_idx", "the attention module's scaling (divided by layer index + 1)"),
    Field("reorder_and_upcast_attn", "scores and softmax in float32 for 16-bit models (as transformers' eager "
                                     "path does); no change for float32/float64"),
    Field("tie_word_embeddings", "one shared tensor for the embedding and the head (summed gradients over PP)"),
    Field("add_cross_attention", "cross-attention layers (encoder-decoder use)",
          refuse_if_true("cross-attention needs encoder states; plait runs GPT-2 as a causal LM")),
    Field("dtype", "default dtype of from_pretrained when none is given"),
    Field("summary_type", "not used by GPT2LMHeadModel (double-heads models only)"),
    Field("summary_use_proj", "not used by GPT2LMHeadModel (double-heads models only)"),
    Field("summary_activation", "not used by GPT2LMHeadModel (double-heads models only)"),
    Field("summary_proj_to_labels", "not used by GPT2LMHeadModel (double-heads models only)"),
    Field("summary_first_dropout", "not used by GPT2LMHeadModel (double-heads models only)"),
)


class GPT2Family(HFDecoder):
    name = "gpt2"
    model_types = ("gpt2",)
    fields = GPT2_FIELDS
    whole_dropouts = ("transformer.drop", "transformer.h.*.attn.resid_dropout", "transformer.h.*.mlp.dropout")
    attention_dropouts = ("transformer.h.*.attn.attn_dropout",)

    def shipped_plan(self, model_type: str) -> Plan:
        return gpt2_plan()

    def embed(self, stage, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = stage.part("embed")(ids) + stage.part("positions")(positions)
        dropout = stage.part("embed_dropout")
        return h if dropout is None else dropout(h)
