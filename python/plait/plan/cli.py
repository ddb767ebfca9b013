"""``plait plan``: search layouts (or estimate one) from the command line.

    plait plan --model llama3-70b --gpu h100 --gpus 64 --global-batch 1024 --seq 8192
    plait plan --layers 48 --hidden 6144 --heads 64 --ffn 24576 --vocab 51200 --seq 2048 --gpu a100 --gpus 64 ...
    plait plan --model llama3-70b --gpu h100 --gpus 64 --global-batch 1024 --tp 8 --pp 4   # estimate one layout
    plait plan --model llama3-8b --gpu h100 --gpus 8 --mode inference --batch 64 --prompt-len 2048 --output-len 256
    plait plan --config job.json [--json] [--plot plan.png]

Bad input (an option out of range, unknown preset, impossible layout, a model larger than
the cluster, a bad config file) prints one line starting "plait plan: error:" (or argparse's
usage line) and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from typing import Any

from ..argtypes import fraction, positive_float, positive_int
from .config import JobSpec, ModelSpec, hardware_from, load_specs, model_from
from .estimate import Estimate, estimate
from .layout import SCHEDULE_ALIASES, SCHEDULES, Layout
from .search import OBJECTIVES, Plan, search

DIMENSIONS = {"layers": "num_layers", "hidden": "hidden", "heads": "num_heads", "kv_heads": "num_kv_heads",
              "ffn": "ffn_hidden", "vocab": "vocab_size", "seq": "seq_len", "mlp": "mlp"}
JOB_FLAGS = {"mode": "mode", "global_batch": "global_batch", "precision": "precision", "zero": "zero_stage",
             "recompute": "recompute", "tp_overlap": "tp_overlap", "memory_margin": "memory_margin",
             "batch": "batch", "prompt_len": "prompt_len", "output_len": "output_len",
             "latency_target_ms": "latency_target_ms"}
LAYOUT_FLAGS = ("dp", "pp", "tp", "vpp", "microbatch_size", "schedule")


# Caps on sizes: larger values are typos, and would only make the search slow or overflow.
MAX_GPUS = 1 << 30
MAX_DIM = 1 << 24          # layers, hidden, heads, FFN, vocabulary, sequence
MAX_BATCH = 1 << 30
MAX_GPUS_PER_NODE = 4096
MAX_VIRTUAL = 1024
MAX_TOP = 100_000


def setup(parser: argparse.ArgumentParser) -> None:
    """Add ``plait plan``'s arguments to `parser` (see the module docstring)."""
    dim, gpus = positive_int(MAX_DIM), positive_int(MAX_GPUS)
    g = parser.add_argument_group("model (a preset, explicit dimensions, or a preset with overrides)")
    g.add_argument("--model", help="preset: llama3-8b, llama3-70b, llama3-405b, gpt3-175b, gpt-1.7b ... gpt-1t")
    for flag in ("layers", "hidden", "heads", "kv-heads", "ffn", "vocab", "seq"):
        g.add_argument(f"--{flag}", type=dim, metavar="N")
    g.add_argument("--mlp", choices=["gelu", "swiglu"])
    g.add_argument("--config", help="JSON (or YAML with PyYAML) file with model/hardware/job sections")
    g = parser.add_argument_group("hardware")
    g.add_argument("--gpu", help="preset: a100-40gb, a100-80gb (a100), h100, h200 (default h100)")
    g.add_argument("--gpus", type=gpus, metavar="N", help="number of GPUs")
    g.add_argument("--gpus-per-node", type=positive_int(MAX_GPUS_PER_NODE), metavar="N")
    g.add_argument("--measured", help="bench result file or directory with measured GEMM efficiencies")
    g = parser.add_argument_group("job")
    g.add_argument("--mode", choices=["train", "inference"])
    g.add_argument("--global-batch", type=positive_int(MAX_BATCH), metavar="N",
                   help="sequences per optimizer step (training)")
    g.add_argument("--precision", choices=["bf16", "fp16", "fp8"])
    g.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="ZeRO stage (default 1)")
    g.add_argument("--recompute", choices=["auto", "none", "selective", "full"])
    g.add_argument("--sp", choices=["auto", "on", "off"], default="auto", help="sequence parallelism")
    g.add_argument("--no-flash", action="store_true", help="attention keeps its s x s scores (no flash attention)")
    g.add_argument("--tp-overlap", type=fraction(), metavar="F", help="fraction of TP communication hidden (0..1)")
    g.add_argument("--no-dp-overlap", action="store_true", help="gradient reduction after the backward pass")
    g.add_argument("--memory-margin", type=fraction(allow_one=False), metavar="F",
                   help="fraction of GPU memory kept free, in [0, 1) (default 0.1)")
    g.add_argument("--batch", type=positive_int(MAX_BATCH), metavar="N", help="concurrent requests (inference)")
    g.add_argument("--prompt-len", type=dim, metavar="N")
    g.add_argument("--output-len", type=dim, metavar="N")
    g.add_argument("--latency-target-ms", type=positive_float(1e9), metavar="MS",
                   help="time-per-output-token bound (inference)")
    g = parser.add_argument_group("fixed layout (estimate it instead of searching)")
    for flag in ("dp", "pp", "tp"):
        g.add_argument(f"--{flag}", type=gpus, metavar="N")
    g.add_argument("--vpp", type=positive_int(MAX_VIRTUAL), metavar="V")
    g.add_argument("--microbatch-size", type=positive_int(MAX_BATCH), metavar="N")
    g.add_argument("--schedule", choices=[*SCHEDULES, *SCHEDULE_ALIASES])
    g = parser.add_argument_group("output")
    g.add_argument("--objective", choices=OBJECTIVES, default="throughput")
    g.add_argument("--top", type=positive_int(MAX_TOP), default=10, metavar="N",
                   help="rows of the ranked table (default 10)")
    g.add_argument("--allow-uneven", action="store_true", help="allow layers not divisible by pp*v")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.add_argument("--plot", nargs="?", const="plait-plan.png", help="write a PNG of the top layouts' breakdowns")
    g.add_argument("--emit", metavar="JOB_FILE", help="write the chosen layout as a plait train job file (YAML)")
    parser.set_defaults(run=run)


def _model(args: argparse.Namespace, model: ModelSpec | None) -> ModelSpec:
    dims = {field: getattr(args, flag) for flag, field in DIMENSIONS.items() if getattr(args, flag) is not None}
    if args.model:
        model = model_from(args.model)
    if model is not None:
        return replace(model, **dims) if dims else model
    missing = [f"--{f.replace('_', '-')}" for f in ("layers", "hidden", "heads", "ffn", "vocab", "seq")
               if getattr(args, f) is None]
    if missing:
        raise ValueError(f"give --model PRESET or the model's dimensions (missing {' '.join(missing)})")
    return model_from(dims)


def build_inputs(args: argparse.Namespace) -> tuple[Any, Any, JobSpec]:
    """ModelSpec, HardwareSpec and JobSpec from the flags, over the --config file's sections."""
    model, cluster, job = load_specs(args.config) if args.config else (None, None, None)
    model = _model(args, model)
    if args.gpu or cluster is None:
        if args.gpus is None and cluster is None:
            raise ValueError("give the number of GPUs with --gpus")
        cluster = hardware_from(args.gpu or (cluster.gpu.name if cluster else "h100"),
                                args.gpus if args.gpus is not None else cluster.num_gpus)
    elif args.gpus is not None:
        cluster = replace(cluster, num_gpus=args.gpus)
    if args.gpus_per_node is not None:
        cluster = replace(cluster, gpus_per_node=args.gpus_per_node)
    if args.measured:
        from .compute import load_measured_efficiencies

        cluster = replace(cluster, measured=load_measured_efficiencies(args.measured, cluster.gpu))
    values = {field: getattr(args, flag) for flag, field in JOB_FLAGS.items() if getattr(args, flag) is not None}
    if args.sp != "auto":
        values["sequence_parallel"] = args.sp == "on"
    if args.no_flash:
        values["flash_attention"] = False
    if args.no_dp_overlap:
        values["dp_overlap"] = False
    if job is None and values.get("mode", "train") == "train" and "global_batch" not in values:
        raise ValueError("training needs --global-batch (sequences per optimizer step)")
    job = replace(job, **values) if job else JobSpec(**values)
    return model, cluster, job


def fixed_layout(args: argparse.Namespace, num_gpus: int) -> Layout | None:
    """The layout the flags fix, or None when none of --dp/--pp/--tp/... is given (search)."""
    if all(getattr(args, f) is None for f in LAYOUT_FLAGS):
        return None
    tp, pp, v = (1 if value is None else value for value in (args.tp, args.pp, args.vpp))
    if args.dp is None and num_gpus % (tp * pp):
        raise ValueError(f"tp*pp = {tp * pp} does not divide the {num_gpus} GPUs; choose tp and pp whose "
                         f"product divides it (or give --dp)")
    dp = num_gpus // (tp * pp) if args.dp is None else args.dp
    schedule = args.schedule or ("interleaved" if v > 1 else "1f1b")
    return Layout(dp, pp, tp, v, 1 if args.microbatch_size is None else args.microbatch_size, schedule)


def _row(rank: int, e: Estimate) -> list[str]:
    lay = e.layout
    head = [str(rank), str(lay.dp), str(lay.pp), str(lay.tp)]
    if e.mode == "inference":
        return head + [f"{e.requests_per_s:.2f}", f"{e.ttft_s * 1e3:.0f}", f"{e.tpot_s * 1e3:.1f}",
                       f"{e.tokens_per_s:,.0f}", f"{e.memory_gb:.1f}", e.dominant_term()]
    return head + [str(lay.num_virtual), str(lay.microbatch_size), lay.schedule, e.recompute,
                   "on" if e.sequence_parallel else "off", f"{e.tokens_per_s:,.0f}", f"{e.tflops_per_gpu:.0f}",
                   f"{e.mfu:.1%}", f"{e.step_time_s:.2f}", f"{e.bubble_fraction:.1%}", f"{e.memory_gb:.1f}",
                   e.dominant_term()]


def format_table(estimates: list[Estimate]) -> str:
    """The ranked table `plait plan` prints."""
    if estimates and estimates[0].mode == "inference":
        header = ["#", "dp", "pp", "tp", "req/s", "TTFT ms", "TPOT ms", "tok/s", "mem GB", "dominant"]
    else:
        header = ["#", "dp", "pp", "tp", "v", "mbs", "schedule", "recompute", "SP", "tokens/s", "TFLOP/s",
                  "MFU", "step s", "bubble", "mem GB", "dominant"]
    rows = [header] + [_row(i + 1, e) for i, e in enumerate(estimates)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows)


class _Progress:
    """Prints 'searched N of M layouts' to stderr, only once a search has run for a while."""

    def __init__(self, after_s: float = 0.5) -> None:
        self.start, self.after_s, self.last, self.shown = time.perf_counter(), after_s, float("-inf"), False

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter() - self.start
        if now >= self.after_s and (now - self.last >= 0.5 or done == total):
            self.last, self.shown = now, True
            print(f"\rplait plan: searched {done:,} of {total:,} layouts", end="", file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.shown:
            print(file=sys.stderr)


def _report(model: ModelSpec, cluster: Any, job: JobSpec) -> dict[str, Any]:
    return {"model": asdict(model), "hardware": asdict(cluster), "job": asdict(job)}


def run(args: argparse.Namespace) -> int:
    """Run ``plait plan``; 0 on success, 1 when only the requested plot failed.

    Bad input raises ValueError/OSError, which :func:`plait.cli.main` prints as one line
    with exit status 2.
    """
    model, cluster, job = build_inputs(args)
    layout = fixed_layout(args, cluster.num_gpus)
    if layout is not None:
        result: Plan | Estimate = estimate(model=model, cluster=cluster, job=job, layout=layout,
                                           allow_uneven=args.allow_uneven)
    else:
        progress = _Progress()
        try:
            result = search(model=model, cluster=cluster, job=job, objective=args.objective,
                            allow_uneven=args.allow_uneven, progress=progress)
        finally:
            progress.finish()
    estimates = [result] if isinstance(result, Estimate) else result.estimates[: args.top]
    if args.emit:
        from plait.train.emit import job_settings, write_job_file

        try:
            if not job.training:
                raise ValueError("--emit writes a training job; plan with --mode train")
            settings, notes = job_settings(estimates[0], job, model.seq_len)
            write_job_file(args.emit, settings, notes, source=model.name)
        except ValueError as exc:
            print(f"plait plan: error: {exc}", file=sys.stderr)
            return 2
    if args.json:
        body = {"estimate": result.as_dict()} if isinstance(result, Estimate) else {"plan": result.as_dict(args.top)}
        print(json.dumps({**_report(model, cluster, job), **body}, indent=2))
    else:
        print(_summary(model, cluster, job, result))
        print(format_table(estimates))
    if args.plot:
        return _plot(estimates, args.plot, f"{model.name} on {cluster.num_gpus} x {cluster.gpu.name}")
    return 0


def _summary(model: ModelSpec, cluster: Any, job: JobSpec, result: Plan | Estimate) -> str:
    what = (f"{model.name} ({model.num_params() / 1e9:.1f}B params, seq {model.seq_len}) on {cluster.num_gpus} x "
            f"{cluster.gpu.name}, " + (f"global batch {job.global_batch}" if job.training else
                                       f"{job.batch} requests of {job.prompt_len}+{job.output_len} tokens"))
    if isinstance(result, Estimate):
        from .explain import describe

        fit = "fits" if result.fits else f"does NOT fit ({result.memory_capacity_gb:.0f} GB usable)"
        return f"{what}\n{describe(result)}; {fit}\n"
    dropped = ", ".join(f"{v} by {k}" for k, v in result.discarded.items() if v) or "none"
    return (f"{what}\n{result.considered} layouts in {result.elapsed_s:.2f} s; discarded: {dropped}\n"
            f"{result.explanation}\n")


def _plot(estimates: list[Estimate], path: str, title: str) -> int:
    from .plot import PlotUnavailable, plot_breakdowns

    try:
        written = plot_breakdowns(estimates[:8], path, title)
    except PlotUnavailable as exc:
        print(f"plait plan: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"plait plan: error: cannot write {path}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {written}", file=sys.stderr)
    return 0
