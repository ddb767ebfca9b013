"""Training throughput and peak memory of the reference GPT per (dp, pp, tp) layout; DP overlap on vs off;
ZeRO-1 on vs off.

    python bench/train.py [--layouts 1,1,1 2,1,1 1,2,1 1,1,2 2,2,2] [--steps 6]
    python bench/train.py --zero-only --layouts 2,1,1 4,1,1 --layers 4 --hidden 512 --steps 3
    plait bench train ...

Each layout runs a ``plait train`` job (:func:`plait.train.train_rank`) of plait's GPT
from scratch on synthetic data (``synthetic: true``: the same batches on every layout) on
local processes, over ``--comm`` (default torch: gloo on CPU, or NCCL when there is a GPU per
rank); AdamW at a constant lr, no weight decay, no clipping (the gradient norm is still
computed, as in every plait train step). Reported: median tokens/s over the steps after the
first (warm-up), and peak memory per rank (CPU: max resident set; GPU: max allocated), the
largest over ranks. ``dp_overlap`` off is the job's ``dp_overlap: false`` (every gradient
bucket reduced after backward).

Layouts with dp > 1 also run with ZeRO-1 (``zero: 1``: AdamW state sharded over DP). For those rows the optimizer-state bytes per rank are exact
(the sum of the state tensors' sizes, largest rank); the peak memory is
measured, and on CPU also given above the memory the rank had before training
(``peak over start``), which removes torch's own few hundred MB, and the
memory after the last step (``end``: what stays between steps, without the
transients).
glibc keeps freed memory in the process, which blurs RSS; with
``MALLOC_MMAP_THRESHOLD_`` set (e.g. 131072) large blocks go back to the
system when freed, and the result is saved under ``..._mmap``. ``--zero-only``
runs just the ZeRO off/on pairs and records them as ``train_zero`` (so a
bigger model for memory does not replace the throughput table).
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
from argparse import ArgumentTypeError

import torch

from plait.bench.common import MAX_RANKS, bench_parser, positive_float, positive_int, ranks, repeats, size
from plait.launch import run_ranks
from plait.mesh import COMM_BACKENDS
from plait.train import TrainJob


def _rss_bytes() -> int:
    """Resident set size of this process now (Linux), 0 where unknown."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def job_settings(model: dict, run: dict, layout: tuple, overlap: bool, zero: int) -> dict:
    """The ``plait train`` job (TrainJob settings) of one row: ``model`` and ``run`` as saved in the JSON."""
    dp, pp, tp = layout
    gpt = (f"layers={model['num_layers']},hidden={model['hidden']},heads={model['num_heads']},"
           f"vocab={model['vocab_size']}")
    return dict(gpt=gpt, synthetic=True, seq=model["seq_len"], dp=dp, pp=pp, tp=tp, dp_overlap=overlap, zero=zero,
                lr_schedule="constant", warmup=0, weight_decay=0.0, clip_grad=0.0, **run)


def bench_rank(rank: int, world: int, settings: dict) -> dict:
    from plait.train import train_rank

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if cuda:
        torch.cuda.set_device(rank)
    job = TrainJob.from_dict(settings)
    start = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    after_steps = []  # memory after each step, the model and optimizer state still alive
    summary = train_rank(job, lambda record: after_steps.append(torch.cuda.memory_allocated() if cuda
                                                                else _rss_bytes()), show=False)
    end = after_steps[-1]
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return dict(tokens_per_s=[r.tokens_per_s for r in summary.records], peak_bytes=peak, start_bytes=start,
                end_bytes=end, state_bytes=summary.optimizer_state_bytes, device="cuda" if cuda else "cpu")


def _zero_savings(rows: list[dict]) -> list[dict]:
    """Per layout with both, ZeRO-1 off vs on (overlap on): optimizer state and peak memory per rank."""
    pairs = []
    for on in (r for r in rows if r["zero"] == 1):
        off = next((r for r in rows if r["zero"] == 0 and r["dp_overlap"] == on["dp_overlap"]
                    and (r["dp"], r["pp"], r["tp"]) == (on["dp"], on["pp"], on["tp"])), None)
        if off is None:
            continue
        pairs.append(dict(layout=[on["dp"], on["pp"], on["tp"]],
                          state_off_mb=off["optimizer_state_bytes"] / 2**20,
                          state_on_mb=on["optimizer_state_bytes"] / 2**20,
                          state_ratio=on["optimizer_state_bytes"] / off["optimizer_state_bytes"],
                          peak_off_mb=off["peak_mb"], peak_on_mb=on["peak_mb"],
                          end_off_mb=off["end_mb"], end_on_mb=on["end_mb"],
                          peak_over_start_off_mb=off["peak_over_start_mb"],
                          peak_over_start_on_mb=on["peak_over_start_mb"],
                          tokens_per_s_off=off["tokens_per_s"], tokens_per_s_on=on["tokens_per_s"]))
    return pairs


def _layout(text: str) -> tuple[int, int, int]:
    """A ``dp,pp,tp`` triple of rank counts (argparse type of ``--layouts``)."""
    parts = text.split(",")
    if len(parts) != 3:
        raise ArgumentTypeError(f"expected dp,pp,tp (three numbers, e.g. 2,1,2), got {text!r}")
    dp, pp, tp = (ranks()(part) for part in parts)
    if dp * pp * tp > MAX_RANKS:
        raise ArgumentTypeError(f"dp*pp*tp = {dp * pp * tp} processes; at most {MAX_RANKS} on one host")
    return dp, pp, tp


def main(argv=None) -> int:
    parser = bench_parser("train", "GPT training throughput per layout")
    parser.add_argument("--layouts", nargs="+", type=_layout,
                        default=[(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2)],
                        help="dp,pp,tp triples")
    parser.add_argument("--steps", type=repeats(), default=6)
    parser.add_argument("--layers", type=positive_int(4096), default=8)
    parser.add_argument("--hidden", type=size(), default=128)
    parser.add_argument("--seq", type=size(), default=64)
    parser.add_argument("--global-batch", type=size(), default=16)
    parser.add_argument("--microbatches", type=positive_int(4096), default=4)
    parser.add_argument("--bucket-mb", type=positive_float(1 << 20), default=25.0, help="DP gradient bucket size")
    parser.add_argument("--comm", choices=COMM_BACKENDS, default="torch",
                        help="communicators of the mesh axes (torch: gloo on CPU, NCCL on CUDA; shm; auto)")
    parser.add_argument("--no-zero", action="store_true", help="skip the ZeRO-1 rows")
    parser.add_argument("--zero-only", action="store_true",
                        help="only ZeRO-1 off vs on (overlap on) per layout with dp > 1; saved as train_zero")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.zero_only and args.no_zero:
        parser.error("--zero-only and --no-zero exclude each other")
    model = dict(vocab_size=512, num_layers=args.layers, hidden=args.hidden, num_heads=4, seq_len=args.seq)
    run = dict(microbatches=args.microbatches, global_batch=args.global_batch, steps=args.steps, seed=0,
               bucket_mb=args.bucket_mb, lr=1e-3, comm=args.comm)
    runs = []   # (layout, dp_overlap, zero, job settings), every job checked before any starts
    for layout in args.layouts:
        variants = [(True, 0)] + ([(False, 0)] if layout[0] > 1 else [])  # (dp_overlap, zero)
        if layout[0] > 1 and not args.no_zero:
            variants.append((True, 1))
        if args.zero_only:
            variants = [(True, 0), (True, 1)] if layout[0] > 1 else []
        for overlap, zero in variants:
            settings = job_settings(model, run, layout, overlap, zero)
            try:
                TrainJob.from_dict(settings, where=f"layout dp,pp,tp={','.join(map(str, layout))}")
            except ValueError as err:
                parser.error(str(err))
            runs.append((layout, overlap, zero, settings))
    rows = []
    for layout, overlap, zero, settings in runs:
        world = layout[0] * layout[1] * layout[2]
        print(f"layout dp,pp,tp={layout} dp_overlap={overlap} zero={zero} on {world} processes ...", flush=True)
        results = run_ranks(bench_rank, world, settings, timeout=1800)
        per_step = [min(r["tokens_per_s"][i] for r in results) for i in range(1, args.steps)]
        rows.append(dict(dp=layout[0], pp=layout[1], tp=layout[2], dp_overlap=overlap, zero=zero,
                         tokens_per_s=statistics.median(per_step),
                         peak_mb=max(r["peak_bytes"] for r in results) / 2**20,
                         peak_over_start_mb=max(r["peak_bytes"] - r["start_bytes"] for r in results) / 2**20,
                         end_mb=max(r["end_bytes"] for r in results) / 2**20,
                         optimizer_state_bytes=max(r["state_bytes"] for r in results),
                         device=results[0]["device"]))
    header = ["dp", "pp", "tp", "dp overlap", "zero", "tokens/s", "peak MB/rank", "peak over start MB",
              "end MB/rank", "opt state MB/rank", "device"]
    table = [[r["dp"], r["pp"], r["tp"], "on" if r["dp_overlap"] else "off", r["zero"], round(r["tokens_per_s"]),
              round(r["peak_mb"], 1), round(r["peak_over_start_mb"], 1), round(r["end_mb"], 1),
              round(r["optimizer_state_bytes"] / 2**20, 2), r["device"]] for r in rows]
    for line in [header, *table]:
        print("  ".join(str(c).rjust(12) for c in line))
    zero_pairs = _zero_savings(rows)
    for pair in zero_pairs:
        print(f"ZeRO-1 on dp,pp,tp={pair['layout']}: optimizer state {pair['state_off_mb']:.2f} -> "
              f"{pair['state_on_mb']:.2f} MB/rank (x{pair['state_ratio']:.3f}), peak {pair['peak_off_mb']:.1f} -> "
              f"{pair['peak_on_mb']:.1f} MB/rank, after training {pair['end_off_mb']:.1f} -> {pair['end_on_mb']:.1f} MB/rank")
    if not args.no_save:
        from plait.bench.common import command_line, write_result

        command = command_line("train", argv)
        # glibc keeps freed memory unless told otherwise, which blurs RSS; a run with a fixed
        # MALLOC_MMAP_THRESHOLD_ is kept apart from one with the default allocator
        mmap_threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        name = ("train_zero" if args.zero_only else "train") + ("_mmap" if mmap_threshold else "")
        path = write_result(name,
                            {"rows": rows, "model": model, "run": run, "zero_savings": zero_pairs,
                             "malloc_mmap_threshold": mmap_threshold,
                             "table": {"columns": header, "rows": table}}, command)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
