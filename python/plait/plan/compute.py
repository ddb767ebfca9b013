"""FLOPs of a transformer layer and the time one GPU takes for them.

FLOPs (Narayanan et al. 2021, sec. 5.1, generalised to GQA and SwiGLU): a layer's forward
pass over T = b*s tokens costs 2*T*(its weight matrices' parameters) in GEMMs plus 4*b*s^2*h
for Q K^T and attention x V (counted over the full s x s square, the convention of that
paper and of PaLM's MFU); the output layer 2*T*h*V. Backward costs twice the forward.
Model FLOPs exclude recomputation; hardware FLOPs include it.

Time: a GEMM runs at ``GPUSpec.gemm_efficiency`` of peak scaled by two shape effects:

* wave quantisation: the output is cut into tiles, one per SM at a time; a last partial
  wave of tiles leaves SMs idle. The best of a few tile shapes is taken, as cuBLAS
  heuristics pick one per problem;
* short reductions: each tile loads its operands and writes its result once per K loop,
  so efficiency falls as k / (k + 64) (normalised to a large K).

A GEMM never runs faster than its operands can stream from HBM (roofline). Element-wise
kernels (norms, activations, dropout, residuals, softmax) are memory bound: their bytes
moved over ``ELEMENTWISE_HBM_EFFICIENCY`` of the HBM bandwidth.

``HardwareSpec.measured`` (from ``load_measured_efficiencies``) replaces the GEMM model by
the measured efficiency of the nearest measured shape.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from .config import GPUSpec, HardwareSpec, ModelSpec

ELEMENTWISE_HBM_EFFICIENCY = 0.8
GEMM_HBM_EFFICIENCY = 0.8
K_HALF = 64
# (tile rows, tile cols, efficiency of the tile shape relative to the largest)
TILES = ((256, 128, 1.0), (128, 256, 1.0), (128, 128, 0.93), (64, 128, 0.8))


@functools.lru_cache(maxsize=65536)
def _shape_factor(num_sms: int, m: int, n: int, k: int) -> float:
    waves = 0.0
    for rows, cols, tile_eff in TILES:
        tiles = math.ceil(m / rows) * math.ceil(n / cols)
        waves = max(waves, tile_eff * tiles / (math.ceil(tiles / num_sms) * num_sms))
    reduction = (k / (k + K_HALF)) / (8192 / (8192 + K_HALF))
    return waves * min(1.0, reduction)


def gemm_efficiency(cluster: HardwareSpec, m: int, n: int, k: int) -> float:
    """Fraction of peak an (m x k) @ (k x n) GEMM reaches on one GPU (before the HBM roofline)."""
    if cluster.measured:
        return _nearest_measured(cluster.measured, m, n, k)
    return cluster.gpu.gemm_efficiency * _shape_factor(cluster.gpu.num_sms, m, n, k)


def gemm_time(cluster: HardwareSpec, m: int, n: int, k: int, peak_tflops: float, batch: int = 1) -> float:
    """Seconds for `batch` GEMMs of (m x k) @ (k x n) in 2-byte precision: compute or HBM bound."""
    flops = 2.0 * m * n * k * batch
    compute = flops / (peak_tflops * 1e12 * gemm_efficiency(cluster, m, n * batch, k))
    traffic = 2.0 * (m * k + k * n + m * n) * batch / (cluster.gpu.hbm_gbs * 1e9 * GEMM_HBM_EFFICIENCY)
    return max(compute, traffic)


def elementwise_time(gpu: GPUSpec, num_bytes: float) -> float:
    """Seconds to stream `num_bytes` through HBM in memory-bound kernels."""
    return num_bytes / (gpu.hbm_gbs * 1e9 * ELEMENTWISE_HBM_EFFICIENCY)


def layer_gemm_shapes(model: ModelSpec, tokens: int, tp: int) -> list[tuple[int, int, int]]:
    """(m, n, k) of a layer's four weight GEMMs on one TP rank: QKV, output, FFN up (+gate), FFN down."""
    kv = tp * model.kv_heads_per_rank(tp) * model.head_dim   # K/V width over all TP ranks
    h, f = model.hidden, model.ffn_hidden
    up = (model.mlp_matrices - 1) * f
    return [(tokens, (h + 2 * kv) // tp, h), (tokens, h, h // tp), (tokens, up // tp, h), (tokens, h, f // tp)]


def layer_forward_flops(model: ModelSpec, microbatch: int) -> tuple[float, float]:
    """(GEMM FLOPs, attention-core FLOPs) of one layer's forward pass for one microbatch, all TP ranks."""
    tokens = microbatch * model.seq_len
    matrices = 2 * model.hidden * model.hidden + 2 * model.hidden * model.kv_dim
    matrices += model.mlp_matrices * model.hidden * model.ffn_hidden
    return 2.0 * tokens * matrices, 4.0 * microbatch * model.seq_len ** 2 * model.hidden


def logits_forward_flops(model: ModelSpec, microbatch: int) -> float:
    return 2.0 * microbatch * model.seq_len * model.hidden * model.vocab_size


def model_flops_per_sequence(model: ModelSpec) -> float:
    """Forward + backward FLOPs for one sequence, without recomputation (the MFU numerator)."""
    gemm, attention = layer_forward_flops(model, 1)
    return 3.0 * (model.num_layers * (gemm + attention) + logits_forward_flops(model, 1))


def attention_time(cluster: HardwareSpec, model: ModelSpec, microbatch: int, tp: int, peak: float,
                   flash: bool) -> float:
    """Seconds for one layer's forward attention core on one TP rank (QK^T, softmax, xV)."""
    s, d = model.seq_len, model.head_dim
    heads = microbatch * model.num_heads // tp
    if flash:
        _, flops = layer_forward_flops(model, microbatch)
        return flops / tp / (peak * 1e12 * cluster.gpu.attention_efficiency)
    return gemm_time(cluster, s, s, d, peak, heads) + gemm_time(cluster, s, d, s, peak, heads)


def layer_elementwise_bytes(model: ModelSpec, microbatch: int, tp: int, sp: bool, flash: bool) -> float:
    """HBM bytes one layer's forward element-wise kernels move on one TP rank.

    Per token: two norms (read + write 2 bytes of h each), two bias-dropout-residual adds
    (read 4, write 2, mask 1; without dropout read 4, write 2), the activation function
    (GELU: read and write f; SwiGLU: read 2f, write f); per attention score without flash
    attention: softmax read + write and dropout read + write + mask.
    """
    tokens = microbatch * model.seq_len
    drop = 1 if model.dropout else 0
    per_h = (8 + 2 * (6 + drop)) * tokens * model.hidden
    per_f = (4 if model.mlp == "gelu" else 6) * tokens * model.ffn_hidden
    scores = 0.0 if flash else (4 + 5 * drop) * model.num_heads * model.seq_len ** 2 * microbatch
    return per_h / (tp if sp else 1) + (per_f + scores) / tp


def _nearest_measured(measured: tuple[tuple[int, int, int, float], ...], m: int, n: int, k: int) -> float:
    def distance(row: tuple[int, int, int, float]) -> float:
        return sum(abs(math.log(a / b)) for a, b in zip(row[:3], (m, n, k)))

    return min(measured, key=distance)[3]


def _number(value: object, whole: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > 0 and (not whole or float(value).is_integer())


def _measured_row(file: Path, row: object, gpu: GPUSpec, precision: str) -> tuple[int, int, int, float]:
    """(m, n, k, efficiency) of one measurement; ValueError naming the file and what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"{file}: a gemm_efficiency entry must be a mapping, got {row!r}")
    missing = [key for key in ("m", "n", "k") if key not in row]
    if missing or not ("efficiency" in row or "tflops" in row):
        raise ValueError(f"{file}: gemm_efficiency entry {row} lacks {missing or ['efficiency or tflops']}")
    if not all(_number(row[key], whole=True) for key in ("m", "n", "k")):
        raise ValueError(f"{file}: m, n, k of {row} must be positive whole numbers")
    value = row["efficiency"] if "efficiency" in row else row["tflops"]
    if not _number(value):
        raise ValueError(f"{file}: the efficiency or tflops of {row} must be a positive number")
    eff = value if "efficiency" in row else value / gpu.peak(precision)
    if not 0 < eff <= 1:
        raise ValueError(f"{file}: efficiency {eff:.3f} of {row} is not in (0, 1]")
    return int(row["m"]), int(row["n"]), int(row["k"]), float(eff)


def load_measured_efficiencies(path: str | Path, gpu: GPUSpec, precision: str = "bf16"
                               ) -> tuple[tuple[int, int, int, float], ...]:
    """GEMM efficiencies from bench result files (a file, or every *.json in a directory).

    A result counts when its ``results`` holds ``"gemm_efficiency": [{"m", "n", "k",
    "efficiency"} or {"m", "n", "k", "tflops"}, ...]``; TFLOP/s are divided by the GPU's
    peak at `precision`. Raises ValueError when nothing usable is found.
    """
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    rows = []
    for file in files:
        try:
            document = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{file}: cannot read measured efficiencies ({exc})") from exc
        except UnicodeDecodeError:
            raise ValueError(f"{file}: not a JSON bench result (not text)") from None
        results = document.get("results", document) if isinstance(document, dict) else {}
        measured = results.get("gemm_efficiency", []) if isinstance(results, dict) else []
        if not isinstance(measured, list):
            raise ValueError(f"{file}: 'gemm_efficiency' must be a list of {{m, n, k, efficiency or tflops}}")
        rows += [_measured_row(file, row, gpu, precision) for row in measured]
    if not rows:
        raise ValueError(f"{path}: no 'gemm_efficiency' measurements found (see "
                         f"plait.plan.compute.load_measured_efficiencies for the format)")
    return tuple(rows)
