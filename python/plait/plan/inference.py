"""Inference estimate: time to first token, time per output token, requests per second.

Each of the dp replicas serves batch/dp concurrent requests (prompt_len in, output_len out):

    TTFT   prefill of the replica's prompts through all layers (pipeline stages one after
           another) with their TP all-reduces and stage sends
    TPOT   one decode step: each stage streams its weights and its share of the KV cache
           from HBM (or is compute bound, whichever is slower), all-reduces a [batch, hidden]
           activation twice per layer, and launches its kernels. With pp > 1 the batch is
           split into pp groups that keep every stage busy, but a token still visits all
           stages: TPOT = pp x stage time
    requests/s = dp x requests per replica / (TTFT + output_len x TPOT)
"""
from __future__ import annotations

from . import comm_cost, compute
from .config import HardwareSpec, JobSpec, ModelSpec
from .estimate import Estimate, capacity_gb
from .layout import Layout, layers_per_stage
from .memory import inference_memory, kv_cache_bytes, prompt_model, stage_params, value_bytes

# Kernel launches per layer in a decode step, and what each costs when CUDA graphs replay them.
KERNELS_PER_LAYER = 12
LAUNCH_S = 3e-6


def _prefill_time(model: ModelSpec, cluster: HardwareSpec, job: JobSpec, layout: Layout,
                  requests: int) -> tuple[float, float, float]:
    """(compute, TP comm, stage sends) seconds to prefill `requests` prompts on one replica."""
    tp, peak = layout.tp, cluster.gpu.peak(job.precision)
    tokens = requests * job.prompt_len
    prompt = prompt_model(model, job)
    layer = sum(compute.gemm_time(cluster, m, n, k, peak) for m, n, k in compute.layer_gemm_shapes(prompt, tokens, tp))
    layer += compute.attention_time(cluster, prompt, requests, tp, peak, True) / 2  # causal: half the square
    layer += compute.elementwise_time(cluster.gpu, compute.layer_elementwise_bytes(prompt, requests, tp, True, True))
    comm, _ = comm_cost.tp_layer_comm(cluster, tokens, model.hidden, tp, False)
    sends = (layout.pp - 1) * comm_cost.p2p_time(cluster, tokens, model.hidden, tp, layout.pp)
    return model.num_layers * layer, model.num_layers * comm, sends


def _decode_stage(model: ModelSpec, cluster: HardwareSpec, job: JobSpec, layout: Layout,
                  requests: int) -> dict[str, float]:
    """Seconds one pipeline stage spends on one decode step of `requests` sequences, by term."""
    per_value = value_bytes(job)
    hbm = cluster.gpu.hbm_gbs * 1e9 * compute.GEMM_HBM_EFFICIENCY
    params = max(stage_params(model, layout, "first"), stage_params(model, layout, "last"))
    flops = 2.0 * params * requests
    weights = max(params * per_value / hbm,
                  flops / (cluster.gpu.peak(job.precision) * 1e12 * cluster.gpu.gemm_efficiency))
    layers = layers_per_stage(model, layout)
    context = job.prompt_len + job.output_len // 2
    kv = kv_cache_bytes(model, requests, context, layers, layout.tp, per_value) / hbm
    comm = layers * comm_cost.tp_layer_comm(cluster, requests, model.hidden, layout.tp, False)[0]
    return {"decode_weights": weights, "decode_kv": kv, "tp_comm": comm,
            "overhead": layers * KERNELS_PER_LAYER * LAUNCH_S}


def inference_estimate(model: ModelSpec, cluster: HardwareSpec, job: JobSpec, layout: Layout) -> Estimate:
    """TTFT, TPOT, requests/s and memory of serving `job` with `layout` (already checked)."""
    requests = job.batch // layout.dp
    prefill, prefill_comm, prefill_sends = _prefill_time(model, cluster, job, layout, requests)
    ttft = prefill + prefill_comm + prefill_sends
    group = max(1, -(-requests // layout.pp))
    stage = _decode_stage(model, cluster, job, layout, group)
    send = comm_cost.p2p_time(cluster, group, model.hidden, layout.tp, layout.pp)
    tpot = layout.pp * (sum(stage.values()) + send)
    total = ttft + job.output_len * tpot
    time = {"prefill": prefill, "tp_comm": prefill_comm, "pp_comm": prefill_sends + job.output_len * layout.pp * send}
    for name, value in stage.items():
        time[name] = time.get(name, 0.0) + job.output_len * layout.pp * value
    requests_per_s = layout.dp * requests / total
    flops_per_request = 2.0 * model.num_params() * (job.prompt_len + job.output_len)
    per_gpu = requests_per_s * flops_per_request / cluster.num_gpus / 1e12
    meets = job.latency_target_ms is None or tpot * 1e3 <= job.latency_target_ms
    return Estimate(layout=layout, mode="inference", recompute="none", sequence_parallel=False,
                    num_microbatches=min(layout.pp, requests), step_time_s=total,
                    tokens_per_s=requests_per_s * job.output_len, tflops_per_gpu=per_gpu,
                    hardware_tflops_per_gpu=per_gpu, mfu=per_gpu / cluster.gpu.peak(job.precision),
                    memory=inference_memory(model, job, layout), memory_capacity_gb=capacity_gb(cluster, job),
                    time=time, ttft_s=ttft, tpot_s=tpot, requests_per_s=requests_per_s, meets_target=meets)
