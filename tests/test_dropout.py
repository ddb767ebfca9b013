"""Layout-invariant dropout: the hash is the documented one, masks are slices of one full mask, statistics hold.

Multi-rank training with dropout against one process is in tests/test_fidelity.py; here the
pieces, in one process: a rank's slice (rows of the global batch, heads of the model) of the
mask equals the same slice of the mask computed whole, whatever the slicing.
"""
from __future__ import annotations

import pytest
import torch

from plait.parallel.dropout import (DropoutScope, LayoutInvariantDropout, dropout_heads, dropout_scope,
                                    dropout_whole, uniform)


def _lowbias32(x: int) -> int:
    """The reference integer hash, in plain Python integers."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_uniform_is_the_documented_hash_without_overflow():
    key = (0xDEADBEEF, 0x12345678)
    counters = [0, 1, 2 ** 31 - 1, 2 ** 32 - 1, 2 ** 32, 3 * 2 ** 40 + 12345, 2 ** 62 + 7]
    got = uniform(torch.tensor(counters, dtype=torch.int64), key).tolist()
    for n, u in zip(counters, got):
        h = _lowbias32((n & 0xFFFFFFFF) ^ key[0])
        h = _lowbias32(h ^ (n >> 32) ^ key[1])
        h = _lowbias32(h ^ key[0])
        assert u == h / 2 ** 32


def test_mask_statistics():
    x = torch.ones(64, 128, 128, dtype=torch.float64)
    with dropout_scope(DropoutScope(seed=3, step=1)):
        y = dropout_whole(x, 0.1, "site")
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - 0.1) < 0.003, dropped
    assert torch.all((y == 0) | ((y - 1 / 0.9).abs() < 1e-12))
    assert y.mean().item() == pytest.approx(1.0, abs=0.005)       # unbiased in expectation


def test_rows_of_the_global_batch_give_slices_of_the_whole_mask():
    x = torch.randn(8, 5, 6, dtype=torch.float64)
    with dropout_scope(DropoutScope(seed=1, step=4, sample_offset=0)):
        whole = dropout_whole(x, 0.3, "transformer.h.0.mlp.dropout")
    parts = []
    for first in (0, 3, 5):                                  # uneven microbatches: rows 0-2, 3-4, 5-7
        last = {0: 3, 3: 5, 5: 8}[first]
        with dropout_scope(DropoutScope(seed=1, step=4, sample_offset=first)):
            parts.append(dropout_whole(x[first:last], 0.3, "transformer.h.0.mlp.dropout"))
    assert torch.equal(torch.cat(parts), whole)


def test_heads_of_the_model_give_slices_of_the_whole_mask():
    probs = torch.rand(3, 8, 5, 5, dtype=torch.float64)
    with dropout_scope(DropoutScope(seed=2, step=0, sample_offset=4)):
        whole = dropout_heads(probs, 0.2, "layers.1.attention_probs", 0, 8)
        shards = [dropout_heads(probs[:, h:h + 2], 0.2, "layers.1.attention_probs", h, 8) for h in range(0, 8, 2)]
    assert torch.equal(torch.cat(shards, dim=1), whole)


def test_keys_change_the_mask():
    x = torch.ones(4, 64, dtype=torch.float64)

    def mask(seed=0, step=0, offset=0, site="a"):
        with dropout_scope(DropoutScope(seed, step, offset)):
            return dropout_whole(x, 0.5, site) == 0

    base = mask()
    assert torch.equal(base, mask())                         # deterministic
    for other in (mask(seed=1), mask(step=1), mask(offset=1), mask(site="b")):
        assert not torch.equal(base, other)


def test_module_is_identity_in_eval_and_in_p0():
    x = torch.randn(4, 7, dtype=torch.float64)
    module = LayoutInvariantDropout(0.5, "drop")
    assert not torch.equal(module(x), x)
    assert torch.equal(module.eval()(x), x)
    assert torch.equal(LayoutInvariantDropout(0.0, "drop")(x), x)
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        LayoutInvariantDropout(1.0, "drop")


def test_recomputation_draws_the_forward_masks():
    """A layer under plait's activation recomputation gets the gradient of the plain forward: the masks
    recomputed in backward (outside the scope) are the forward's."""
    from torch import nn

    from plait.train.recompute import recompute

    def build():
        torch.manual_seed(0)
        layer = nn.Sequential(nn.Linear(6, 6, dtype=torch.float64), LayoutInvariantDropout(0.4, "layer.drop"))
        return layer

    x = torch.randn(5, 6, dtype=torch.float64)
    grads = []
    for checkpointed in (False, True):
        layer = build()
        if checkpointed:
            recompute(layer)
        with dropout_scope(DropoutScope(seed=9, step=2)):
            out = layer(x)
        (out ** 2).sum().backward()
        grads.append(layer[0].weight.grad)
    assert torch.equal(grads[0], grads[1])
