"""Train the reference GPT on a DP x PP x TP mesh, on synthetic tokens derived from the seed.

    torchrun --nproc-per-node 8 examples/train_gpt.py --dp 2 --pp 2 --tp 2 --schedule 1f1b \\
        --microbatches 4 --steps 10 --seed 0 [--zero 1] [--clip-grad 1.0]
    python examples/train_gpt.py --steps 10 --seed 0          # the same model, one process

Without torchrun the job runs in one process (dp = pp = tp = 1) on the same
data, which is the reference the distributed run must agree with. ``--zero 1``
shards AdamW's state over DP (ZeRO-1): the same losses, 1/dp of the state per rank. ``--json``
prints one JSON object per step (step, loss, tokens_per_s) and a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="train the reference GPT with plait (DP x PP x TP)")
    layout = p.add_argument_group("layout")
    layout.add_argument("--dp", type=int, default=1)
    layout.add_argument("--pp", type=int, default=1)
    layout.add_argument("--tp", type=int, default=1)
    layout.add_argument("--vpp", type=int, default=1, help="virtual stages per rank (interleaved or zb1p schedule)")
    layout.add_argument("--schedule", default="1f1b", help="gpipe, 1f1b, interleaved or zb1p")
    layout.add_argument("--sp", action="store_true", help="sequence parallelism")
    model = p.add_argument_group("model")
    model.add_argument("--layers", type=int, default=4)
    model.add_argument("--hidden", type=int, default=64)
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--ffn", type=int, default=None)
    model.add_argument("--seq", type=int, default=32)
    model.add_argument("--vocab", type=int, default=128)
    model.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    run = p.add_argument_group("run")
    run.add_argument("--microbatches", type=int, default=4)
    run.add_argument("--global-batch", type=int, default=16)
    run.add_argument("--steps", type=int, default=10)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--lr", type=float, default=3e-3)
    run.add_argument("--bucket-mb", type=float, default=25.0)
    run.add_argument("--no-dp-overlap", action="store_true", help="reduce DP gradients only after backward")
    run.add_argument("--zero", type=int, default=0, choices=[0, 1],
                     help="1: ZeRO-1, AdamW state sharded over DP (reduce-scatter grads, all-gather params)")
    run.add_argument("--clip-grad", type=float, default=0.0, help="clip gradients to this global L2 norm (0: off)")
    run.add_argument("--json", action="store_true", help="one JSON object per step on stdout")
    return p.parse_args(argv)


def _progress(step: int, total: int, loss: float, tokens_per_s: float) -> str:
    done = int(20 * step / total)
    return f"\r  [{'#' * done}{'.' * (20 - done)}] step {step}/{total}  loss {loss:.4f}  {tokens_per_s:,.0f} tokens/s"


def main(argv=None) -> int:
    args = parse(argv)
    from plait.models import GPTConfig, TrainJob, train

    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not under_torchrun and args.dp * args.pp * args.tp > 1:
        print(f"no torchrun: running the same model in one process (dp=pp=tp=1) instead of "
              f"{args.dp}x{args.pp}x{args.tp}", file=sys.stderr)
        args.dp = args.pp = args.tp = 1
        if args.schedule == "interleaved" or args.vpp > 1:
            args.schedule, args.vpp = "1f1b", 1
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
    try:
        job = TrainJob(model=GPTConfig(vocab_size=args.vocab, num_layers=args.layers, hidden=args.hidden,
                                       num_heads=args.heads, seq_len=args.seq, ffn_hidden=args.ffn,
                                       sequence_parallel=args.sp, dtype=getattr(torch, args.dtype)),
                       dp=args.dp, pp=args.pp, tp=args.tp, num_virtual=args.vpp, schedule=args.schedule,
                       microbatches=args.microbatches, global_batch=args.global_batch, steps=args.steps,
                       seed=args.seed, lr=args.lr, bucket_mb=args.bucket_mb, dp_overlap=not args.no_dp_overlap,
                       zero=args.zero, clip_grad=args.clip_grad)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if job.world_size != world:
            raise ValueError(f"dp*pp*tp = {job.world_size} but {world} processes were started; "
                             f"run torchrun --nproc-per-node {job.world_size}")
    except ValueError as exc:
        print(f"train_gpt: {exc}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 and not args.json:
        print(f"plait train_gpt: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq {args.seq}, "
              f"vocab {args.vocab}; dp={job.dp} pp={job.pp} tp={job.tp} vpp={job.num_virtual} "
              f"schedule={job.schedule} microbatches={job.microbatches} global batch={job.global_batch} "
              f"zero={job.zero}", flush=True)

    def report(record) -> None:
        if rank != 0:
            return
        if args.json:
            print(json.dumps({"step": record.step, "loss": record.loss, "tokens_per_s": record.tokens_per_s}),
                  flush=True)
        else:
            line = _progress(record.step + 1, job.steps, record.loss, record.tokens_per_s)
            # redraw in place on a terminal; one line per step in logs
            print(line, end="", flush=True) if sys.stdout.isatty() else print(line.lstrip("\r"), flush=True)

    start = time.perf_counter()
    records = train(job, report)
    if rank == 0:
        elapsed = time.perf_counter() - start
        mean_tps = sum(r.tokens_per_s for r in records) / len(records)
        summary = {"summary": True, "steps": len(records), "first_loss": records[0].loss,
                   "final_loss": records[-1].loss, "mean_tokens_per_s": mean_tps, "seconds": elapsed,
                   "layout": [job.dp, job.pp, job.tp], "zero": job.zero,
                   "optimizer_state_bytes_rank0": records[-1].extra["optimizer_state_bytes"]}
        if args.json:
            print(json.dumps(summary), flush=True)
        else:
            print(f"{chr(10) if sys.stdout.isatty() else ''}  done: loss {records[0].loss:.4f} -> {records[-1].loss:.4f} in {len(records)} steps, "
                  f"{mean_tps:,.0f} tokens/s, {elapsed:.1f} s", flush=True)
    import plait

    plait.destroy_mesh()
    return 0


if __name__ == "__main__":
    sys.exit(main())
