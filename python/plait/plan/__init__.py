"""plait.plan: choose (dp, pp, tp, microbatches, schedule, recomputation) for a model on a cluster.

    import plait
    from plait.plan import presets
    model = presets.model_preset("llama3-70b")
    cluster = presets.hardware("h100", 64)
    job = plait.plan.JobSpec(global_batch=1024)
    plan = plait.plan.search(model=model, cluster=cluster, job=job, objective="throughput")
    print(plan.explanation)
    est = plait.plan.estimate(model=model, cluster=cluster, job=job,
                              layout=plait.plan.Layout(dp=2, pp=4, tp=8, microbatch_size=1))

Modules, one cost term each: ``memory`` (ZeRO states, Korthikanti activations, KV cache),
``compute`` (FLOPs, shape-dependent GEMM efficiency), ``comm_cost`` (TP/PP/DP collectives on
NVLink and NICs), ``bubble`` (schedule simulator or closed forms), ``estimate`` and
``inference`` (step time, throughput, latency), ``search`` (enumerate, filter, rank,
explain), ``cli`` (``plait plan``).
"""
from .bubble import Bubble, pipeline_bubble
from .config import GPUSpec, HardwareSpec, JobSpec, ModelSpec, load_specs
from .estimate import Estimate, estimate
from .layout import SCHEDULES, Layout, check_layout
from .presets import gpu_preset, hardware, model_preset
from .search import Plan, search

__all__ = ["Bubble", "pipeline_bubble", "GPUSpec", "HardwareSpec", "JobSpec", "ModelSpec", "load_specs",
           "Estimate", "estimate", "SCHEDULES", "Layout", "check_layout", "gpu_preset", "hardware",
           "model_preset", "Plan", "search"]
