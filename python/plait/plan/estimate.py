"""One layout's predicted step time, throughput and memory: ``estimate(model=, cluster=, job=, layout=)``.

Training, per optimizer step, on the pipeline rank that paces the pipeline (the last:
it adds the output layer):

    work per microbatch   W = layers x (GEMMs + attention + element-wise) x (1 fwd + 2 bwd)
                              + recomputation + exposed TP collectives + stage sends
    pipeline              m W / (1 - bubble)           bubble from ``pipeline_bubble``
    step                  pipeline + exposed DP gradient reduction + optimizer update

Throughput figures follow Narayanan et al. 2021: model FLOPs per step (no recomputation)
give ``tflops_per_gpu`` and ``mfu``; ``hardware_tflops_per_gpu`` also counts recomputation,
which is what that paper's Table 1 reports. Inference lives in ``inference.py``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from . import comm_cost, compute
from .bubble import pipeline_bubble
from .config import RECOMPUTE_MODES, HardwareSpec, JobSpec, ModelSpec
from .layout import Layout, check_layout, layers_per_stage, num_microbatches, resolve_sp
from .memory import MemoryBreakdown, grad_bytes, stage_params, training_memory

# Adam update, bytes per local parameter: read fp32 master, m, v and the gradient; write
# master, m, v and the 2-byte working copy.
OPTIMIZER_STEP_BYTES = 4 * 3 + 2 + 4 * 3 + 2


@dataclass(frozen=True)
class Estimate:
    """Predicted cost of one layout. Times in seconds, memory in GB per GPU.

    ``time`` splits ``step_time_s`` into terms that add up to it (training: gemm,
    logits, attention, elementwise, recompute, tp_comm, pp_comm, bubble, dp_comm, optimizer;
    inference: prefill, decode_weights, decode_kv, tp_comm, pp_comm, overhead).
    """

    layout: Layout
    mode: str
    recompute: str
    sequence_parallel: bool
    num_microbatches: int
    step_time_s: float
    tokens_per_s: float
    tflops_per_gpu: float
    hardware_tflops_per_gpu: float
    mfu: float
    memory: MemoryBreakdown
    memory_capacity_gb: float
    time: dict[str, float] = field(default_factory=dict)
    bubble_fraction: float = 0.0
    bubble_source: str = "closed-form"
    ttft_s: float | None = None
    tpot_s: float | None = None
    requests_per_s: float | None = None
    meets_target: bool = True

    @property
    def memory_gb(self) -> float:
        return self.memory.total

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.memory_capacity_gb

    def dominant_term(self) -> str:
        """The largest entry of ``time``."""
        return max(self.time, key=self.time.get)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON: every field plus memory_gb and fits."""
        out = asdict(self)
        out["memory"] = self.memory.as_dict()
        out.update(memory_gb=self.memory_gb, fits=self.fits)
        return out


def _microbatch_times(model: ModelSpec, cluster: HardwareSpec, job: JobSpec, layout: Layout, recompute: str,
                      sp: bool) -> dict[str, float]:
    """Seconds per microbatch (forward + backward) on the pacing rank, by term."""
    b, tp, peak = layout.microbatch_size, layout.tp, cluster.gpu.peak(job.precision)
    tokens = b * model.seq_len
    gemm = sum(compute.gemm_time(cluster, m, n, k, peak) for m, n, k in compute.layer_gemm_shapes(model, tokens, tp))
    attention = compute.attention_time(cluster, model, b, tp, peak, job.flash_attention)
    elementwise = compute.elementwise_time(cluster.gpu, compute.layer_elementwise_bytes(model, b, tp, sp,
                                                                                        job.flash_attention))
    tp_fwd, tp_bwd = comm_cost.tp_layer_comm(cluster, tokens, model.hidden, tp, sp)
    if recompute == "full":
        redo, tp_redo = gemm + attention + elementwise, tp_fwd
    elif recompute == "selective" and not job.flash_attention:
        redo, tp_redo = attention, 0.0  # flash attention recomputes scores inside its backward anyway
    else:
        redo, tp_redo = 0.0, 0.0
    layers = layers_per_stage(model, layout)
    logits = 3 * compute.gemm_time(cluster, tokens, -(-model.vocab_size // tp), model.hidden, peak)
    logits += compute.elementwise_time(cluster.gpu, 3 * 4.0 * tokens * model.vocab_size / tp)
    sends = 2 * layout.num_virtual * comm_cost.p2p_time(cluster, tokens, model.hidden, tp, layout.pp)
    return {"gemm": 3 * gemm * layers, "logits": logits, "attention": 3 * attention * layers,
            "elementwise": 3 * elementwise * layers, "recompute": redo * layers,
            "tp_comm": (tp_fwd + tp_bwd + tp_redo) * layers * (1 - job.tp_overlap), "pp_comm": sends}


def _training_estimate(model: ModelSpec, cluster: HardwareSpec, job: JobSpec, layout: Layout, recompute: str,
                       sp: bool) -> Estimate:
    m = num_microbatches(job, layout)
    per_mb = _microbatch_times(model, cluster, job, layout, recompute, sp)
    work = sum(per_mb.values())
    bubble = pipeline_bubble(layout.schedule, layout.pp, m, layout.num_virtual)
    pipeline = m * work / (1 - bubble.fraction)
    params = max(stage_params(model, layout, "first"), stage_params(model, layout, "last"))
    dp_exposed = _dp_exposed(cluster, job, layout, params, m, work)
    local = params / layout.dp if job.zero_stage >= 1 else params
    optimizer = compute.elementwise_time(cluster.gpu, OPTIMIZER_STEP_BYTES * local)
    time = {k: m * v for k, v in per_mb.items()}
    time.update(bubble=pipeline - m * work, dp_comm=dp_exposed, optimizer=optimizer)
    step = pipeline + dp_exposed + optimizer
    flops = job.global_batch * compute.model_flops_per_sequence(model)
    gemm_f, attention_f = compute.layer_forward_flops(model, 1)
    redo_f = {"full": gemm_f + attention_f, "selective": 0.0 if job.flash_attention else attention_f,
              "none": 0.0}[recompute]
    hardware_flops = flops + job.global_batch * model.num_layers * redo_f
    per_gpu = 1e12 * step * cluster.num_gpus
    memory = training_memory(model, job, layout, recompute, sp)
    return Estimate(layout=layout, mode="train", recompute=recompute, sequence_parallel=sp, num_microbatches=m,
                    step_time_s=step, tokens_per_s=job.global_batch * model.seq_len / step,
                    tflops_per_gpu=flops / per_gpu, hardware_tflops_per_gpu=hardware_flops / per_gpu,
                    mfu=flops / per_gpu / cluster.gpu.peak(job.precision), memory=memory,
                    memory_capacity_gb=capacity_gb(cluster, job), time=time, bubble_fraction=bubble.fraction,
                    bubble_source=bubble.source)


def _dp_exposed(cluster: HardwareSpec, job: JobSpec, layout: Layout, params: float, m: int, work: float) -> float:
    """Seconds of DP communication not hidden under backward passes.

    ZeRO 0/1 reduce the accumulated gradients once, under the last microbatch's backward
    when ``dp_overlap``. ZeRO 2 keeps no full-size accumulation buffer, so it
    reduce-scatters after every microbatch (under that microbatch's backward) and
    all-gathers the updated weights after the step; ZeRO 3 also gathers the weights for
    every microbatch's forward and backward.
    """
    if layout.dp == 1:
        return 0.0
    stride, backward = layout.pp * layout.tp, (work * 2 / 3 if job.dp_overlap else 0.0)
    grads = grad_bytes(job) * params
    if job.zero_stage < 2:
        return max(0.0, comm_cost.dp_grad_reduction(cluster, grads, layout.dp, stride) - backward)
    scatter = comm_cost.allgather_time(cluster, grads, layout.dp, stride)
    exposed = m * max(0.0, scatter - backward) + comm_cost.allgather_time(cluster, 2.0 * params, layout.dp, stride)
    if job.zero_stage == 3:
        gather = 2 * comm_cost.allgather_time(cluster, 2.0 * params, layout.dp, stride)
        exposed += m * max(0.0, gather - work)
    return exposed


def capacity_gb(cluster: HardwareSpec, job: JobSpec) -> float:
    """GPU memory a layout may use: the GPU's memory less the job's margin."""
    return cluster.gpu.memory_gb * (1 - job.memory_margin)


def recompute_choices(job: JobSpec, layout: Layout) -> tuple[str, ...]:
    """Recomputation modes to consider, cheapest first: the layout's, the job's, or all three."""
    if layout.recompute is not None:
        return (layout.recompute,)
    if job.recompute != "auto":
        return (job.recompute,)
    return RECOMPUTE_MODES


def estimate(*, model: ModelSpec, cluster: HardwareSpec, job: JobSpec, layout: Layout,
             allow_uneven: bool = False) -> Estimate:
    """Predict one layout; ValueError when the layout breaks a rule (see ``plait.plan.layout``).

    With recompute "auto" (job) and none set on the layout, the least recomputation that
    fits in memory is taken (or full recomputation when nothing fits).
    """
    check_layout(model, cluster, job, layout, allow_uneven)
    if not job.training:
        from .inference import inference_estimate

        return inference_estimate(model, cluster, job, layout)
    sp = resolve_sp(job, layout, model)
    result = None
    for recompute in recompute_choices(job, layout):
        result = _training_estimate(model, cluster, job, layout, recompute, sp)
        if result.fits:
            break
    return result
