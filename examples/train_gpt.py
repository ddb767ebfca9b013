"""Train plait's GPT through plait.train's Python API: one TrainJob, run by train_rank on every rank.

    python examples/train_gpt.py --data data.bin --vocab 512 --dp 2 --pp 2 --tp 2     # starts 8 processes
    torchrun --nproc-per-node 8 examples/train_gpt.py --data data.bin --vocab 512 --dp 2 --pp 2 --tp 2
    python examples/train_gpt.py --data data.bin --vocab 512                         # one process

A token file comes from ``plait data prepare --tokenizer DIR --input FILES --output data.bin``
(``python examples/demo.py --workdir DIR`` leaves one, with its 512-id tokenizer, in DIR).
The same job from the command line is ``plait train --gpt gpt-tiny,vocab=512 --data data.bin
--dp 2 --pp 2 --tp 2``: every TrainJob field is a flag and a job-file key.
"""
from __future__ import annotations

import argparse
import os
import sys

from plait.launch import run_ranks
from plait.train import StepRecord, Summary, TrainJob, train_rank


def on_step(record: StepRecord) -> None:
    """Called on every rank after each step (here: a line from global rank 0)."""
    if os.environ.get("RANK", "0") == "0" and record.step % 5 == 0:
        print(f"step {record.step}: loss {record.loss:.4f}, lr {record.lr:.1e}, grad norm {record.grad_norm:.3f}",
              flush=True)


def rank_main(rank: int, world: int, job: TrainJob) -> Summary:
    return train_rank(job, on_step, show=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="token file (plait data prepare)")
    p.add_argument("--vocab", type=int, required=True, help="the tokenizer's vocabulary size")
    p.add_argument("--gpt", default="gpt-tiny", help="a GPT preset and/or dimensions (plait.models.presets)")
    for axis in ("dp", "pp", "tp"):
        p.add_argument(f"--{axis}", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save", help="checkpoint directory (resumes from its latest checkpoint when there is one)")
    args = p.parse_args(argv)
    job = TrainJob(gpt=f"{args.gpt},vocab={args.vocab}", data=args.data, seq=64, global_batch=16, microbatches=4,
                   steps=args.steps, dp=args.dp, pp=args.pp, tp=args.tp, lr=3e-3, warmup=2, eval_fraction=0.02,
                   save=args.save, resume="latest" if args.save else None)
    if "WORLD_SIZE" in os.environ or job.world_size == 1:     # torchrun, or one process: this is a rank
        summary = train_rank(job, on_step, show=False)
    else:                                                      # start dp * pp * tp local processes
        summary = run_ranks(rank_main, job.world_size, job, timeout=float("inf"))[0]
    if os.environ.get("RANK", "0") == "0" and summary.records:
        first, last = summary.records[0], summary.records[-1]
        print(f"{job.parallel.short()}: loss {first.loss:.4f} -> {last.loss:.4f} in steps {first.step}..{last.step}"
              f", eval loss {summary.eval_loss:.4f}, {summary.seconds:.1f} s"
              + (f"; saved {summary.checkpoint}" if summary.checkpoint else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
