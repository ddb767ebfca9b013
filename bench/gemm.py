"""Fused linear kernels vs cuBLAS, eager PyTorch and torch.compile on Llama-3 TP-shard shapes.

    python bench/gemm.py [--models 8b 70b] [--tp 1 2 4 8] [--tokens 2048 8192 16384] [--plot]
    python bench/gemm.py --shard 8b:2 70b:8 --tokens 4096 16384     # chosen (model, TP) pairs only
    plait bench gemm ...

Shapes: the MLP GEMMs of Llama-3 8B (hidden 4096, FFN 14336) and 70B (8192,
28672) as one TP rank sees them: up-projection [T, H] x [FFN/tp, H]^T and
down-projection [T, FFN/tp] x [H, FFN/tp]^T. bf16, each variant timed with
CUDA events (median of ``--reps`` after ``--warmup``):

- ``cublas``: ``torch.matmul(x, w.T)`` alone: the GEMM-only yardstick;
- ``plait_gemm``: ``fused_linear`` with no epilogue (GEMM-only, vs cublas);
- ``eager``: ``F.gelu(F.linear(x, w, b))``;
- ``compile``: ``torch.compile`` of the same function;
- ``plait``: ``fused_linear(x, w, b, "gelu")``; forward, and forward+backward
  (``_fb`` variants, 3x the FLOPs).

Needs a CUDA GPU (``--smoke`` runs tiny shapes on the CPU interpreter to check
the script itself). JSON to bench/results/, a PNG with ``--plot``.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from plait.bench.common import bench_parser, ranks, repeats, size

MODELS = {"8b": (4096, 14336), "70b": (8192, 28672)}


def _timer(device: torch.device, fn, warmup: int, reps: int) -> float:
    """Median seconds of ``fn()``: CUDA events on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def shapes(shards: list[tuple[str, int]], tokens: list[int]) -> list[dict]:
    """The up- and down-projection GEMMs of each (model, TP) shard at each token count."""
    out = []
    for model, tp in shards:
        hidden, ffn = MODELS[model]
        for t in tokens:
            out.append(dict(model=model, tp=tp, tokens=t, gemm="up", m=t, n=ffn // tp, k=hidden))
            out.append(dict(model=model, tp=tp, tokens=t, gemm="down", m=t, n=hidden, k=ffn // tp))
    return out


def parse_shard(text: str) -> tuple[str, int]:
    """'70b:8' -> ("70b", 8), for --shard."""
    model, _, tp = text.partition(":")
    if model not in MODELS or not tp.isdigit() or int(tp) < 1 or MODELS[model][1] % int(tp):
        raise argparse.ArgumentTypeError(f"{text!r}: write MODEL:TP with MODEL one of {', '.join(MODELS)} and TP "
                                         f"a divisor of the model's FFN size")
    return model, int(tp)


def run_shape(shape: dict, device: torch.device, dtype: torch.dtype, warmup: int, reps: int,
              use_compile: bool) -> dict:
    from plait.kernels import fused_linear

    m, n, k = shape["m"], shape["n"], shape["k"]
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
    b = torch.randn(n, device=device, dtype=dtype)
    flops = 2.0 * m * n * k

    def eager(x, w, b):
        return F.gelu(F.linear(x, w, b))

    variants = {"cublas": lambda: torch.matmul(x, w.t()),
                "plait_gemm": lambda: fused_linear(x, w),
                "eager": lambda: eager(x, w, b),
                "plait": lambda: fused_linear(x, w, b, "gelu")}
    compiled = torch.compile(eager) if use_compile else None
    if compiled is not None:
        variants["compile"] = lambda: compiled(x, w, b)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    dy = torch.randn(m, n, device=device, dtype=dtype)

    def fwd_bwd(f):
        return lambda: torch.autograd.grad(f(xg, wg, bg), (xg, wg, bg), dy)

    variants["eager_fb"] = fwd_bwd(eager)
    variants["plait_fb"] = fwd_bwd(lambda x_, w_, b_: fused_linear(x_, w_, b_, "gelu"))
    if compiled is not None:
        variants["compile_fb"] = fwd_bwd(compiled)
    row = dict(shape)
    for name, fn in variants.items():
        seconds = _timer(device, fn, warmup, reps)
        row[f"{name}_tflops"] = (3 if name.endswith("_fb") else 1) * flops / seconds / 1e12
    return row


def summarize(rows: list[dict]) -> dict:
    """Ratios at the median shape (by FLOPs) and GEMM-only efficiency at the large shapes."""
    by_size = sorted(rows, key=lambda r: r["m"] * r["n"] * r["k"])
    median = by_size[len(by_size) // 2]
    large = by_size[-max(1, len(by_size) // 4):]
    summary = {"median_shape": {k: median[k] for k in ("model", "tp", "tokens", "gemm", "m", "n", "k")},
               "fused_vs_eager_fwd": median["plait_tflops"] / median["eager_tflops"],
               "fused_vs_eager_fwd_bwd": median["plait_fb_tflops"] / median["eager_fb_tflops"],
               "gemm_vs_cublas_large": statistics.median(r["plait_gemm_tflops"] / r["cublas_tflops"] for r in large)}
    if "compile_tflops" in median:
        summary["fused_vs_compile_fwd"] = median["plait_tflops"] / median["compile_tflops"]
        summary["fused_vs_compile_fwd_bwd"] = median["plait_fb_tflops"] / median["compile_fb_tflops"]
    return summary


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']} tp{r['tp']} {r['gemm']} T{r['tokens']}" for r in rows]
    names = [n for n in ("cublas", "plait_gemm", "eager", "compile", "plait") if f"{n}_tflops" in rows[0]]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.5), 5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(rows))], [r[f"{name}_tflops"] for r in rows], width, label=name)
    ax.set_xticks([j + 0.4 for j in range(len(rows))], labels, rotation=75, fontsize=7)
    ax.set_ylabel("TFLOP/s (forward)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = bench_parser("gemm", "fused linear kernels vs cuBLAS / eager / torch.compile")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["8b", "70b"])
    parser.add_argument("--tp", type=ranks(), nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--shard", type=parse_shard, nargs="+", metavar="MODEL:TP",
                        help="only these (model, TP) pairs, e.g. 8b:2 70b:8 (instead of --models x --tp)")
    parser.add_argument("--tokens", type=size(), nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--warmup", type=repeats(0), default=5)
    parser.add_argument("--reps", type=repeats(), default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--plot", action="store_true", help="also write a PNG next to the JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter (checks the script)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype = torch.device("cpu"), torch.float32
        todo = [dict(model="smoke", tp=1, tokens=40, gemm="up", m=40, n=24, k=32)]
        args.warmup, args.reps = 1, 2
    elif not torch.cuda.is_available():
        print("bench gemm needs a CUDA GPU (use --smoke to check the script on the CPU)", file=sys.stderr)
        return 2
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        todo = shapes(args.shard or [(m, tp) for m in args.models for tp in args.tp], args.tokens)
    rows = []
    for i, shape in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {shape['model']} tp={shape['tp']} {shape['gemm']} "
              f"M={shape['m']} N={shape['n']} K={shape['k']}", flush=True)
        rows.append(run_shape(shape, device, dtype, args.warmup, args.reps, not args.no_compile))
    summary = summarize(rows)
    names = [n for n in ("cublas", "plait_gemm", "eager", "compile", "plait", "eager_fb", "compile_fb", "plait_fb")
             if f"{n}_tflops" in rows[0]]
    header = ["model", "tp", "gemm", "tokens", *[f"{n} TF/s" for n in names]]
    table = [[r["model"], r["tp"], r["gemm"], r["tokens"], *[round(r[f"{n}_tflops"], 1) for n in names]]
             for r in rows]
    for line in [header, *table]:
        print("  ".join(str(c).rjust(10) for c in line))
    print("summary:", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()})
    if not args.no_save and not args.smoke:
        from plait.bench.common import command_line, write_result

        command = command_line("gemm", argv)
        path = write_result("gemm", {"rows": rows, "summary": summary, "table": {"columns": header, "rows": table}},
                            command)
        print(f"wrote {path}")
        if args.plot:
            try:
                plot(rows, str(path.with_suffix(".png")))
                print(f"wrote {path.with_suffix('.png')}")
            except ImportError:
                print("matplotlib is not installed: no plot (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
