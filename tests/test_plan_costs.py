"""plait.plan bubble, compute and communication terms against hand computations (and plait.pp's simulator)."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from plait.plan import bubble, comm_cost, compute, hardware, model_preset
from plait.plan.bubble import closed_form_bubble, pipeline_bubble


def test_closed_form_bubbles() -> None:
    assert closed_form_bubble("1f1b", 4, 8).fraction == pytest.approx(3 / 11)
    assert closed_form_bubble("gpipe", 4, 8) == (pytest.approx(3 / 11), 8, "closed-form", 8)
    assert closed_form_bubble("1f1b", 4, 8)[1:] == (4, "closed-form", 1)
    assert closed_form_bubble("1f1b", 8, 3).peak_inflight == 3
    inter = closed_form_bubble("interleaved", 4, 8, 2)
    assert inter.fraction == pytest.approx(1.5 / 9.5)
    assert inter.peak_inflight == 2 * 4 + 4 - 1  # Megatron-LM warm-up 2(p-1) + (v-1)p, plus one
    assert inter.last_inflight == (2 - 1) * 4 + 1
    zb = closed_form_bubble("zb1p", 4, 8)
    assert zb.fraction == pytest.approx(3 / 27) and zb.peak_inflight == 4 and zb.last_inflight == 4
    assert zb.fraction < closed_form_bubble("1f1b", 4, 8).fraction / 2
    assert closed_form_bubble("1f1b", 1, 8) == (0.0, 1, "closed-form", 1)
    with pytest.raises(ValueError, match="unknown schedule"):
        closed_form_bubble("2f2b", 4, 8)


def test_interleaving_shrinks_the_bubble_by_v() -> None:
    for p, m in ((4, 8), (8, 64), (16, 32)):
        plain, inter = closed_form_bubble("1f1b", p, m).fraction, closed_form_bubble("interleaved", p, m, 4).fraction
        assert inter < plain
        assert inter / (1 - inter) == pytest.approx(plain / (1 - plain) / 4)  # bubble/work = (p-1)/(v m)


class _FakeSim:
    bubble_fraction = [0.25, 0.2]
    peak_activations = [3, 1]


class _FakeSchedule:
    def simulate(self, forward: float, backward: float, weight: float | None = None) -> _FakeSim:
        assert (forward, backward) == (1.0, 2.0)
        return _FakeSim()


def test_pipeline_bubble_uses_the_simulator_when_importable_and_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def build(name: str, num_stages: int, num_microbatches: int, num_virtual: int = 1) -> _FakeSchedule:
        calls.append((name, num_stages, num_microbatches, num_virtual))
        return _FakeSchedule()

    monkeypatch.setattr(bubble, "_simulator", lambda: build)
    monkeypatch.setattr(bubble, "_spent_s", 0.0)
    pipeline_bubble.cache_clear()
    try:
        first = pipeline_bubble("1f1b", 3, 5, 1)
        assert first == (0.25, 3, "simulator", 1)
        assert pipeline_bubble("1f1b", 3, 5, 1) is first
        assert calls == [("1f1b", 3, 5, 1)]  # cached per (schedule, p, m, v)
        assert pipeline_bubble("1f1b", 1, 5, 1).source == "closed-form"  # no pipeline, nothing to simulate
        too_long = bubble.MAX_SIMULATED_ACTIONS  # beyond the budget the closed form answers
        assert pipeline_bubble("1f1b", 4, too_long, 1).source == "closed-form"
    finally:
        pipeline_bubble.cache_clear()


def test_closed_form_agrees_with_plait_pp_simulator() -> None:
    import plait.pp  # noqa: F401  (the simulator is part of plait: a broken import must fail, not skip)
    checked = 0
    pipeline_bubble.cache_clear()
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb1p", 1)):
        for p, m in ((2, 4), (4, 8), (4, 16), (8, 16)):
            sim = bubble.simulated_bubble(schedule, p, m, v)
            if sim is None:
                continue  # plait.pp does not offer this schedule
            closed = closed_form_bubble(schedule, p, m, v)
            assert sim.fraction == pytest.approx(closed.fraction, abs=1e-9), (schedule, p, m, v)
            assert (sim.peak_inflight, sim.last_inflight) == (closed.peak_inflight, closed.last_inflight), \
                (schedule, p, m, v)
            checked += 1
    assert checked >= 8


def test_flops_match_narayanan_formula() -> None:
    # Narayanan et al. 2021 eq. 3 without recomputation: 72 B s l h^2 (1 + s/(6h) + V/(12 l h)).
    model = model_preset("gpt-1t")
    s, l, h, v = 2048, 128, 25600, 51200
    expected = 72 * s * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))
    assert compute.model_flops_per_sequence(model) == pytest.approx(expected, rel=1e-3)


def test_gemm_efficiency_falls_for_small_and_ragged_shapes() -> None:
    cluster = hardware("a100-80gb", 8)
    big = compute.gemm_efficiency(cluster, 8192, 8192, 8192)
    assert big == pytest.approx(cluster.gpu.gemm_efficiency, rel=0.02)
    assert compute.gemm_efficiency(cluster, 8192, 8192, 128) < 0.8 * big  # short reduction
    assert compute.gemm_efficiency(cluster, 256, 256, 8192) < 0.5 * big  # 4 tiles on 108 SMs
    # A tiny GEMM is bound by HBM, not by FLOPs.
    peak = cluster.gpu.peak("bf16")
    t = compute.gemm_time(cluster, 1, 8192, 8192, peak)
    assert t == pytest.approx(2 * (8192 + 8192 * 8192 + 8192) / (cluster.gpu.hbm_gbs * 1e9 * 0.8))


def test_measured_efficiencies_replace_the_model(tmp_path: Path) -> None:
    cluster = hardware("h100", 8)
    result = {"results": {"gemm_efficiency": [{"m": 4096, "n": 4096, "k": 4096, "efficiency": 0.5},
                                              {"m": 64, "n": 64, "k": 64, "tflops": 98.9}]}}
    (tmp_path / "gemm-h100.json").write_text(json.dumps(result))
    measured = compute.load_measured_efficiencies(tmp_path, cluster.gpu)
    assert measured == ((4096, 4096, 4096, 0.5), (64, 64, 64, pytest.approx(0.1)))
    with_measured = replace(cluster, measured=measured)
    assert compute.gemm_efficiency(with_measured, 8192, 4096, 4096) == 0.5
    assert compute.gemm_efficiency(with_measured, 32, 64, 128) == pytest.approx(0.1)
    (tmp_path / "other.json").write_text(json.dumps({"results": {}}))
    with pytest.raises(ValueError, match="no 'gemm_efficiency'"):
        compute.load_measured_efficiencies(tmp_path / "other.json", cluster.gpu)


def test_collective_costs_by_hand() -> None:
    cluster = hardware("a100-80gb", 64)
    bw, lat = 300e9 * 0.8, 3e-6
    n = 1e9
    ring = 2 * 7 / 8 * n / bw + 2 * 7 * lat
    assert comm_cost.allreduce_time(cluster, n, 8) == pytest.approx(min(ring, 2 * n / bw + 6 * lat))
    assert comm_cost.allgather_time(cluster, n, 8) == pytest.approx(7 / 8 * n / bw + 7 * lat)
    # A DP group of 8 with stride 8 (one GPU per node) runs on the NICs only.
    nic, nic_lat = 25e9 * 0.8, 8e-6
    expected = min(2 * 7 / 8 * n / nic + 14 * nic_lat, 2 * n / nic + 6 * nic_lat)
    assert comm_cost.allreduce_time(cluster, n, 8, stride=8) == pytest.approx(expected)
    # Stride 2: 4 ranks per node over 2 nodes: intra reduce-scatter + all-gather, inter all-reduce of n/4.
    assert comm_cost.group_placement(cluster, 8, 2) == (4, 2)
    hier = 2 * (3 / 4 * n / bw + 3 * lat) + min(n / 4 / nic + 2 * nic_lat, 2 * n / 4 / nic + 2 * nic_lat)
    assert comm_cost.allreduce_time(cluster, n, 8, stride=2) == pytest.approx(hier)
    assert comm_cost.allreduce_time(cluster, n, 1) == 0.0


def test_tp_and_pipeline_communication() -> None:
    cluster = hardware("h100", 16)
    fwd, bwd = comm_cost.tp_layer_comm(cluster, 4096, 8192, 8, sp=False)
    one = comm_cost.allreduce_time(cluster, 2 * 4096 * 8192, 8)
    assert (fwd, bwd) == (pytest.approx(2 * one), pytest.approx(2 * one))
    assert comm_cost.tp_layer_comm(cluster, 4096, 8192, 1, sp=True) == (0.0, 0.0)
    inside = comm_cost.p2p_time(cluster, 4096, 8192, 4, 2)  # pp*tp = 8: one node
    across = comm_cost.p2p_time(cluster, 4096, 8192, 8, 2)  # pp*tp = 16: crosses nodes
    assert inside == pytest.approx(3e-6 + 2 * 4096 * 8192 / 4 / (450e9 * 0.8))
    assert across == pytest.approx(8e-6 + 2 * 4096 * 8192 / 8 / (50e9 * 0.8))
    assert math.isclose(comm_cost.p2p_time(cluster, 4096, 8192, 8, 1), 0.0)
