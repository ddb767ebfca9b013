"""Named models and GPUs, with the publication each number comes from.

Models
  gpt3-175b         Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1:
                    96 layers, d_model 12288, 96 heads, context 2048. Vocabulary 51200 is
                    GPT-2's 50257 padded as Megatron-LM pads it (a multiple of 128 * tp).
  llama3-8b/70b/405b  Dubey et al. 2024, "The Llama 3 Herd of Models", Table 3: layers,
                    model dim, FFN dim, heads, 8 KV heads, vocabulary 128,000 (+256 special
                    tokens in the released tokenizer: 128256), SwiGLU, untied embeddings;
                    pre-training sequence length 8192.
  gpt-1.7b ... gpt-1t   Narayanan et al. 2021, "Efficient Large-Scale Language Model
                    Training on GPU Clusters Using Megatron-LM", Table 1 (heads, hidden,
                    layers; vocabulary 51200, sequence 2048, FFN 4*hidden, GELU).
  gpt-22b           Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
                    Transformer Models", Table 3 (64 heads, hidden 6144, 48 layers).

GPUs (NVIDIA datasheets; dense tensor-core peaks, i.e. without 2:4 sparsity)
  a100-40gb / a100-80gb   A100 SXM: 312 TFLOP/s bf16/fp16, HBM 1555 / 2039 GB/s, 108 SMs,
                    NVLink 3: 600 GB/s per GPU both directions (300 each way). DGX A100: 8
                    GPUs per node, one 200 Gb/s HDR InfiniBand NIC per GPU (25 GB/s).
  h100              H100 SXM5 80 GB: 989 TFLOP/s bf16, 1979 fp8, HBM3 3.35 TB/s, 132 SMs,
                    NVLink 4: 900 GB/s (450 each way). DGX H100: one 400 Gb/s NDR NIC per
                    GPU (50 GB/s).
  h200              H200 SXM 141 GB: compute as H100 SXM, HBM3e 4.8 TB/s, NVLink 900 GB/s.

The efficiencies (fraction of peak reached by large GEMMs and by flash attention in
training, clocks under sustained load included) are this planner's calibration, not
datasheet numbers. A100: 0.75 for GEMMs, chosen by comparing with Narayanan et al. 2021
Table 1 (so those rows of bench/plan_validation.py are not an independent test of it);
0.55 for flash attention (FlashAttention-2 paper: 50-70% of peak forward+backward).
H100/H200: 0.75 (about 740 TFLOP/s, what cuBLAS sustains on large bf16 GEMMs) and 0.5 for
attention; set before comparing with any H100 run.
"""
from __future__ import annotations

from dataclasses import replace

from .config import GPUSpec, HardwareSpec, ModelSpec


def _gpt(name: str, layers: int, hidden: int, heads: int, vocab: int = 51200, seq: int = 2048) -> ModelSpec:
    """A GPT-2/3 style model as the Megatron papers train it: GELU MLP of 4*hidden, dropout, tied embeddings."""
    return ModelSpec(name, layers, hidden, heads, 4 * hidden, vocab, seq, mlp="gelu", dropout=True,
                     tied_embeddings=True)


def _llama(name: str, layers: int, hidden: int, heads: int, ffn: int) -> ModelSpec:
    return ModelSpec(name, layers, hidden, heads, ffn, 128256, 8192, num_kv_heads=8, mlp="swiglu")


MODELS: dict[str, ModelSpec] = {m.name: m for m in [
    _gpt("gpt3-175b", 96, 12288, 96),
    _llama("llama3-8b", 32, 4096, 32, 14336),
    _llama("llama3-70b", 80, 8192, 64, 28672),
    _llama("llama3-405b", 126, 16384, 128, 53248),
    # Narayanan et al. 2021, Table 1 (name: parameters in billions as the table gives them).
    _gpt("gpt-1.7b", 24, 2304, 24),
    _gpt("gpt-3.6b", 30, 3072, 32),
    _gpt("gpt-7.5b", 36, 4096, 32),
    _gpt("gpt-18b", 40, 6144, 48),
    _gpt("gpt-39b", 48, 8192, 64),
    _gpt("gpt-76b", 60, 10240, 80),
    _gpt("gpt-146b", 80, 12288, 96),
    _gpt("gpt-310b", 96, 16384, 128),
    _gpt("gpt-530b", 105, 20480, 128),
    _gpt("gpt-1t", 128, 25600, 160),
    # Korthikanti et al. 2022, Table 3.
    _gpt("gpt-22b", 48, 6144, 64),
]}

GPUS: dict[str, tuple[GPUSpec, dict[str, float]]] = {
    "a100-40gb": (GPUSpec("a100-40gb", 40, {"bf16": 312, "fp16": 312}, 1555, 108, 0.75, 0.55),
                  {"intra_node_gbs": 300, "inter_node_gbs": 25}),
    "a100-80gb": (GPUSpec("a100-80gb", 80, {"bf16": 312, "fp16": 312}, 2039, 108, 0.75, 0.55),
                  {"intra_node_gbs": 300, "inter_node_gbs": 25}),
    "h100": (GPUSpec("h100", 80, {"bf16": 989, "fp16": 989, "fp8": 1979}, 3350, 132, 0.75, 0.5),
             {"intra_node_gbs": 450, "inter_node_gbs": 50}),
    "h200": (GPUSpec("h200", 141, {"bf16": 989, "fp16": 989, "fp8": 1979}, 4800, 132, 0.75, 0.5),
             {"intra_node_gbs": 450, "inter_node_gbs": 50}),
}
GPU_ALIASES = {"a100": "a100-80gb", "a100-80": "a100-80gb", "a100-40": "a100-40gb", "h100-sxm": "h100",
               "h100-80gb": "h100", "h200-141gb": "h200"}


def _unknown(kind: str, name: str, known: list[str]) -> ValueError:
    return ValueError(f"unknown {kind} preset {name!r}; known: {', '.join(known)}")


def model_preset(name: str) -> ModelSpec:
    """The ModelSpec called `name` (case-insensitive); ValueError listing the presets otherwise."""
    key = name.lower()
    if key not in MODELS:
        raise _unknown("model", name, sorted(MODELS))
    return MODELS[key]


def gpu_preset(name: str) -> GPUSpec:
    key = GPU_ALIASES.get(name.lower(), name.lower())
    if key not in GPUS:
        raise _unknown("gpu", name, sorted(GPUS) + sorted(GPU_ALIASES))
    return GPUS[key][0]


def hardware(gpu: str, num_gpus: int, **overrides: float) -> HardwareSpec:
    """`num_gpus` of the named GPU in 8-GPU nodes with that system's NVLink and NICs."""
    key = GPU_ALIASES.get(gpu.lower(), gpu.lower())
    spec = gpu_preset(key)
    links = GPUS[key][1]
    gpus_per_node = int(overrides.pop("gpus_per_node", 8))
    return replace(HardwareSpec(spec, num_gpus, gpus_per_node=min(gpus_per_node, num_gpus), **links), **overrides)
