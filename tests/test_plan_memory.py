"""plait.plan memory formulas against hand computations from the papers they come from."""
from __future__ import annotations

from dataclasses import replace

import pytest

from plait.plan import JobSpec, Layout, model_preset
from plait.plan.memory import (GB, grad_bytes, kv_cache_bytes, layer_activation_bytes, model_state_bytes,
                               stage_params, training_memory)

GPT3 = model_preset("gpt3-175b")  # s=2048, h=12288, a=96, GELU 4h, dropout
S, H, A = 2048, 12288, 96
SBH = S * H


@pytest.mark.parametrize("t", [1, 2, 8])
def test_korthikanti_no_recompute_without_sp(t: int) -> None:
    # Korthikanti et al. 2022, eq. for tensor parallelism: sbh (10 + 24/t + 5as/(ht))
    expected = SBH * (10 + 24 / t + 5 * A * S / (H * t))
    assert layer_activation_bytes(GPT3, 1, t, False, "none", flash=False) == pytest.approx(expected)


@pytest.mark.parametrize("t", [2, 4, 8])
def test_korthikanti_sequence_parallel_and_selective(t: int) -> None:
    assert layer_activation_bytes(GPT3, 1, t, True, "none", False) == pytest.approx(SBH * (34 / t + 5 * A * S / (H * t)))
    assert layer_activation_bytes(GPT3, 1, t, True, "selective", False) == pytest.approx(SBH * 34 / t)
    assert layer_activation_bytes(GPT3, 1, t, False, "selective", False) == pytest.approx(SBH * (10 + 24 / t))
    assert layer_activation_bytes(GPT3, 1, t, False, "full", False) == pytest.approx(2 * SBH)
    assert layer_activation_bytes(GPT3, 1, t, True, "full", False) == pytest.approx(2 * SBH / t)


def test_korthikanti_five_fold_reduction_for_gpt3() -> None:
    # The paper's headline: selective recomputation + SP needs ~5x less than the TP baseline (t=8).
    baseline = layer_activation_bytes(GPT3, 1, 8, False, "none", False)
    ours = layer_activation_bytes(GPT3, 1, 8, True, "selective", False)
    assert baseline / ours == pytest.approx(23 / 4.25)


def test_gqa_swiglu_layer_by_hand() -> None:
    llama = model_preset("llama3-70b")  # h=8192, 8 KV heads of 128, f=28672, no dropout
    s, h, kv, f, t = 8192, 8192, 1024, 28672, 8
    replicated = 8 * s * h  # two norm inputs, QKV input, FC1 input, 2 bytes each
    split = 2 * s * (2 * h + 2 * kv) + 6 * s * f  # Q, K, V, out-proj input; gate, up, product
    assert layer_activation_bytes(llama, 1, t, True, "none", True) == pytest.approx((replicated + split) / t)
    assert layer_activation_bytes(llama, 1, t, False, "none", True) == pytest.approx(replicated + split / t)
    # Microbatch size scales it linearly; flash attention keeps no scores so selective == none.
    assert layer_activation_bytes(llama, 3, t, True, "none", True) == pytest.approx(3 * (replicated + split) / t)
    assert layer_activation_bytes(llama, 1, t, True, "selective", True) == layer_activation_bytes(
        llama, 1, t, True, "none", True)


def test_zero_model_states_match_zero_paper_table1() -> None:
    # Rajbhandari et al. 2020, Table 1: 7.5B parameters, N_d = 64: 120, 31.4, 16.6, 1.88 GB.
    for stage, expected in enumerate([120, 31.4, 16.6, 1.875]):
        assert sum(model_state_bytes(7.5e9, stage, 64)) / GB == pytest.approx(expected, rel=5e-3)  # the table rounds to 3 digits


def test_bf16_training_keeps_fp32_gradients() -> None:
    assert grad_bytes(JobSpec(precision="fp16")) == 2 and grad_bytes(JobSpec(precision="bf16")) == 4
    weights, grads, optimizer = model_state_bytes(1e9, 1, 8, grad=4)
    assert (weights, grads, optimizer) == (2e9, 4e9, 12e9 / 8)


def test_parameter_counts_match_published_sizes() -> None:
    for name, billions in (("llama3-8b", 8.03), ("llama3-70b", 70.6), ("llama3-405b", 405.8),
                           ("gpt3-175b", 175.0), ("gpt-1t", 1008.0), ("gpt-530b", 529.6)):
        assert model_preset(name).num_params() / 1e9 == pytest.approx(billions, rel=0.01), name


def test_stage_params_split_layers_and_embeddings() -> None:
    model = model_preset("llama3-8b")
    per_layer = (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) / 4 + 2 * 4096
    first = stage_params(model, Layout(dp=1, pp=4, tp=4), "first")
    assert first == pytest.approx(8 * per_layer + 128256 * 4096 / 4)
    assert stage_params(model, Layout(dp=1, pp=4, tp=4), "last") == pytest.approx(first + 4096)
    whole = stage_params(model, Layout(), "first")
    assert whole == pytest.approx(model.num_params(), rel=1e-6)


def _job(**kw: object) -> JobSpec:
    return JobSpec(global_batch=16, precision="bf16", zero_stage=1, recompute="none", **kw)


def test_1f1b_first_rank_holds_p_microbatches_of_its_layers() -> None:
    model = replace(model_preset("llama3-8b"), vocab_size=32000)
    layout = Layout(dp=1, pp=4, tp=2, microbatch_size=1, schedule="1f1b")
    per_layer = layer_activation_bytes(model, 1, 2, True, "none", True)
    mem = training_memory(model, _job(), layout, "none", True)
    # 8 layers per rank x 4 microbatches in flight = all 32 layers' worth (Korthikanti sec. 4.2.3).
    assert mem.activations * GB == pytest.approx(32 * per_layer)
    gpipe = training_memory(model, _job(), replace(layout, schedule="gpipe"), "none", True)
    # GPipe: every rank holds all 16 microbatches; the last also the output layer's inputs and fp32 logits.
    output = 4 * 8192 * 4096 / 2 + 4 * 8192 * 32000 / 2
    assert gpipe.activations * GB == pytest.approx(8 * 16 * per_layer + output)


def test_interleaved_factor_is_one_plus_p_minus_1_over_pv() -> None:
    model = replace(model_preset("llama3-8b"), vocab_size=32000)
    layout = Layout(dp=1, pp=4, tp=2, num_virtual=2, microbatch_size=1, schedule="interleaved")
    per_layer = layer_activation_bytes(model, 1, 2, True, "none", True)
    mem = training_memory(model, _job(), layout, "none", True)
    assert mem.activations * GB == pytest.approx(32 * (1 + 3 / 8) * per_layer)


def test_full_recompute_adds_one_layer_working_set_and_zero_shards_states() -> None:
    model = replace(model_preset("llama3-8b"), vocab_size=32000)
    layout = Layout(dp=4, pp=1, tp=2, microbatch_size=1)
    full = training_memory(model, replace(_job(), zero_stage=3), layout, "full", True)
    stored = 32 * layer_activation_bytes(model, 1, 2, True, "full", True)
    working = layer_activation_bytes(model, 1, 2, True, "none", True)
    output = 4 * 8192 * 4096 / 2 + 4 * 8192 * 32000 / 2  # norm + output-layer inputs, fp32 logits
    assert full.activations * GB == pytest.approx(stored + working + output)
    params = stage_params(model, layout, "first")
    assert full.weights * GB == pytest.approx(2 * params / 4)
    assert full.grads * GB == pytest.approx(4 * params / 4)
    assert full.optimizer * GB == pytest.approx(12 * params / 4)


def test_kv_cache_by_hand() -> None:
    # Llama-3 70B: 80 layers x 8 KV heads x 128 x (K and V) x 2 bytes = 320 KiB per token.
    model = model_preset("llama3-70b")
    assert kv_cache_bytes(model, 1, 1, 80, 1, 2) == 2 * 80 * 8 * 128 * 2
    assert kv_cache_bytes(model, 4, 8192, 80, 8, 2) == 4 * 8192 * 2 * 80 * 1 * 128 * 2
    assert kv_cache_bytes(model, 1, 10, 80, 16, 2) == kv_cache_bytes(model, 1, 10, 80, 8, 2)  # KV replicated
