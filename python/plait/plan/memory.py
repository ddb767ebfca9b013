"""Memory per GPU: model states under ZeRO, activations per Korthikanti et al. 2022, KV cache.

Model states (Rajbhandari et al. 2020, "ZeRO", sec. 3 and Table 1), mixed-precision Adam,
per parameter: 2 bytes of fp16/bf16 weights, 2 of gradients, 12 of optimizer states (fp32
master copy, momentum, variance). ZeRO stage 1 shards the 12 over the dp ranks, stage 2
the gradients too, stage 3 the weights too. With bf16 (and fp8) training the gradients
are accumulated and reduced in fp32, 4 bytes (Megatron-LM turns this on for bf16, since
bf16 sums lose precision): ``grad_bytes``.

Activations of one transformer layer for one microbatch (Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models", sec. 4), s sequence, b microbatch,
h hidden, a heads, t tensor parallel, in bytes:

    no recomputation, no SP       sbh (10 + 24/t + 5as/(ht))
    no recomputation, SP          sbh (34/t + 5as/(ht))
    selective recomputation       the 5as/(ht) term goes (attention scores recomputed)
    full recomputation            2sbh (the layer input; /t with SP)

The constants come from the tensors each op keeps for backward; ``layer_activation_bytes``
rebuilds them term by term so the same count covers grouped-query attention (K and V of
width kv_dim), SwiGLU (three FFN-wide tensors instead of two), models without dropout, and
flash attention (no s x s scores kept). For GPT (kv_dim = h, GELU, f = 4h, dropout) it
reduces to the table above.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .bubble import pipeline_bubble
from .config import JobSpec, ModelSpec
from .layout import Layout, layers_per_stage, num_microbatches

GB = 1e9
# Bytes per parameter of weights, gradients and optimizer states (ZeRO's "K = 12").
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 2, 12


@dataclass(frozen=True)
class MemoryBreakdown:
    """GB per GPU on the most loaded pipeline rank, by what holds it."""

    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    kv_cache: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.kv_cache

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def value_bytes(job: JobSpec) -> int:
    """Bytes per weight or KV value at inference: 1 in fp8, else 2."""
    return 1 if job.precision == "fp8" else 2


def prompt_model(model: ModelSpec, job: JobSpec) -> ModelSpec:
    """The model as prefill sees it: sequences of the prompt's length, no dropout, untied embeddings."""
    return replace(model, seq_len=job.prompt_len, dropout=False, tied_embeddings=False)


def grad_bytes(job: JobSpec) -> int:
    """Bytes per gradient: 2 for fp16 training (ZeRO's accounting), 4 (fp32 main grads) for bf16/fp8."""
    return GRAD_BYTES if job.precision == "fp16" else 4


def model_state_bytes(params: float, zero_stage: int, dp: int, grad: int = GRAD_BYTES) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) in bytes for `params` parameters on one GPU."""
    weights, grads, optimizer = WEIGHT_BYTES * params, grad * params, OPTIMIZER_BYTES * params
    if zero_stage >= 1:
        optimizer /= dp
    if zero_stage >= 2:
        grads /= dp
    if zero_stage >= 3:
        weights /= dp
    return weights, grads, optimizer


def stage_params(model: ModelSpec, layout: Layout, rank: str) -> float:
    """Parameters one GPU of pipeline rank "first" or "last" holds (tensor-parallel shard).

    The first rank holds the input embedding, the last the output layer (a copy of the
    embedding when tied and pp > 1, as Megatron-LM keeps it); with pp = 1 one rank has both.
    K and V are replicated when tp does not divide the KV heads (see plait.heads).
    """
    tp = layout.tp
    kv_width = tp * model.kv_heads_per_rank(tp) * model.head_dim   # K/V rows over all TP ranks
    layer = (2 * model.hidden * model.hidden + 2 * model.hidden * kv_width
             + model.mlp_matrices * model.hidden * model.ffn_hidden) / tp + 2 * model.hidden
    params = layers_per_stage(model, layout) * layer
    embedding = model.embedding_params() / tp
    if layout.pp == 1:
        return params + embedding * (1 if model.tied_embeddings else 2) + model.hidden
    return params + embedding + (model.hidden if rank == "last" else 0)


def layer_activation_bytes(model: ModelSpec, microbatch: int, tp: int, sp: bool, recompute: str,
                           flash: bool) -> float:
    """Bytes one layer keeps for backward for one microbatch on one GPU (module docstring)."""
    s, b, h, f = model.seq_len, microbatch, model.hidden, model.ffn_hidden
    sbh = s * b * h
    replicated_t = tp if sp else 1
    if recompute == "full":
        return 2 * sbh / replicated_t
    drop = 1 if model.dropout else 0
    kv = tp * model.kv_heads_per_rank(tp) * model.head_dim  # K/V width over all TP ranks
    # LayerNorm inputs 4sbh, QKV input 2sbh, FC1 input 2sbh, two dropout masks 2sbh.
    replicated = (8 + 2 * drop) * sbh
    # Q, K, V and the output projection's input; GELU input and output (SwiGLU: gate, up, product).
    split = 2 * s * b * (2 * h + 2 * kv) + (4 if model.mlp == "gelu" else 6) * s * b * f
    scores = 0.0
    if recompute == "none" and not flash:
        # softmax output 2 bytes, dropout mask 1 and dropout output 2 per score, per head.
        scores = (2 + 3 * drop) * model.num_heads * s * s * b
    return replicated / replicated_t + (split + scores) / tp


def transient_activation_bytes(model: ModelSpec, microbatch: int, tp: int, sp: bool, recompute: str,
                               flash: bool) -> float:
    """Extra bytes while one layer's backward runs: what recomputation rebuilds for it."""
    if recompute == "none":
        return 0.0
    full = layer_activation_bytes(model, microbatch, tp, sp, "none", flash)
    if recompute == "full":
        return full
    return full - layer_activation_bytes(model, microbatch, tp, sp, "selective", flash)


def training_memory(model: ModelSpec, job: JobSpec, layout: Layout, recompute: str, sp: bool) -> MemoryBreakdown:
    """Per-GPU memory of the more loaded of the first and last pipeline ranks, in GB."""
    m = num_microbatches(job, layout)
    b, tp, v = layout.microbatch_size, layout.tp, layout.num_virtual
    per_layer = layer_activation_bytes(model, b, tp, sp, recompute, job.flash_attention)
    chunk_layers = layers_per_stage(model, layout) / v
    transient = transient_activation_bytes(model, b, tp, sp, recompute, job.flash_attention)
    sbh = model.seq_len * b * model.hidden
    held = pipeline_bubble(layout.schedule, layout.pp, m, v)
    first_inflight, last_inflight = (held.peak_inflight, held.last_inflight) if layout.pp > 1 else (1, 1)
    # Embedding dropout mask per microbatch in flight; final norm and output-layer inputs
    # (2 + 2 bytes) and fp32 logits (4 bytes) for one microbatch (Korthikanti et al., sec. 4.3).
    embedding = (sbh if model.dropout else 0) / (tp if sp else 1) * max(1, first_inflight // v)
    output = 4 * sbh / (tp if sp else 1) + 4 * model.seq_len * b * model.vocab_size / tp
    if layout.pp == 1:
        candidates = {"first": per_layer * chunk_layers + embedding + output}
    else:
        candidates = {"first": per_layer * chunk_layers * first_inflight + embedding,
                      "last": per_layer * chunk_layers * last_inflight + output}
    best = None
    for rank, activations in candidates.items():
        weights, grads, optimizer = model_state_bytes(stage_params(model, layout, rank), job.zero_stage, layout.dp,
                                                      grad_bytes(job))
        cand = MemoryBreakdown(weights / GB, grads / GB, optimizer / GB, (activations + transient) / GB)
        if best is None or cand.total > best.total:
            best = cand
    return best


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, value_bytes: int) -> int:
    """K and V of one token over `layers` layers of `kv_heads` heads each (what a serving rank holds per token)."""
    return 2 * layers * kv_heads * head_dim * value_bytes


def kv_cache_bytes(model: ModelSpec, requests: int, tokens: int, layers: int, tp: int, value_bytes: int) -> float:
    """K and V of `tokens` tokens for `requests` sequences over `layers` layers on one GPU."""
    kv_heads_local = model.kv_heads_per_rank(tp)
    return requests * tokens * kv_bytes_per_token(layers, kv_heads_local, model.head_dim, value_bytes)


def inference_memory(model: ModelSpec, job: JobSpec, layout: Layout) -> MemoryBreakdown:
    """Weights, KV cache for every request of the replica at full length, and prefill scratch, in GB."""
    per_value = value_bytes(job)
    weights = max(stage_params(model, layout, "first"), stage_params(model, layout, "last")) * per_value
    requests = job.batch // layout.dp
    layers = layers_per_stage(model, layout)
    kv = kv_cache_bytes(model, requests, job.prompt_len + job.output_len, layers, layout.tp, per_value)
    # Prefill of one request: one layer's activations (flash attention) and its fp32 logits row.
    scratch = layer_activation_bytes(prompt_model(model, job), 1, layout.tp, True, "none", True) + 4 * model.vocab_size
    return MemoryBreakdown(weights=weights / GB, activations=scratch / GB, kv_cache=kv / GB)
