"""Activation recomputation: keep fewer activations for backward, recompute them instead.

======================  ==========================================================
mode                    what is wrapped in ``torch.utils.checkpoint`` (non-reentrant)
======================  ==========================================================
``none``                nothing
``selective``           each decoder layer's attention module (its scores and softmax
                        are the activations that grow with the sequence)
``full``                each decoder layer: only its input is kept
======================  ==========================================================

Modules keep their names and parameters (the wrapper replaces the instance's ``forward``),
so checkpoints, optimizer state and gradients are unchanged; only memory and time move.
Tensor-parallel collectives inside a recomputed region run again in backward, in the same
order on every TP rank, and the recomputation runs in the dropout scope of the forward, so its
layout-invariant dropout masks are the forward's (:mod:`plait.parallel.dropout`).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..parallel.dropout import current_scope, dropout_scope

ATTENTION_NAMES = ("self_attn", "attn")   # transformers' Llama/Mistral/Qwen2 and GPT-2


def recompute(module: nn.Module) -> None:
    """Make ``module`` recompute its forward in backward instead of keeping its activations."""
    forward = module.forward

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        scope = current_scope()     # the recomputation must draw the forward's dropout masks
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), dropout_scope(scope)), **kwargs)

    module.forward = run


def apply_recompute(model, mode: str) -> None:
    """Apply ``mode`` (module doc) to every decoder layer of this rank's stages."""
    if mode == "none":
        return
    for stage in model.stages:
        for layer in stage.layers():
            if mode == "full":
                recompute(layer)
                continue
            attention = next((getattr(layer, n) for n in ATTENTION_NAMES if hasattr(layer, n)), None)
            if attention is None:
                raise ValueError(f"recompute 'selective' needs the layers' attention module (one of "
                                 f"{ATTENTION_NAMES}); {type(layer).__name__} has none: use 'full'")
            recompute(attention)
