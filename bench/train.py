"""Training throughput and peak memory of the reference GPT per (dp, pp, tp) layout; DP overlap on vs off.

    python bench/train.py [--layouts 1,1,1 2,1,1 1,2,1 1,1,2 2,2,2] [--steps 6]
    plait bench train ...

Each layout runs ``examples/train_gpt.py``'s job (``plait.models.train``) on
local processes: gloo on CPU, or NCCL when there is a GPU per rank. Reported:
median tokens/s over the steps after the first (warm-up), and peak memory per
rank (CPU: max resident set; GPU: max allocated), the largest over ranks.
"""
from __future__ import annotations

import argparse
import resource
import shlex
import statistics
import sys

import torch

from plait.launch import run_ranks


def bench_rank(rank: int, world: int, layout: tuple, model: dict, run: dict, overlap: bool) -> dict:
    import plait
    from plait.models import GPTConfig, TrainJob, train

    dp, pp, tp = layout
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if cuda:
        torch.cuda.set_device(rank)
    job = TrainJob(model=GPTConfig(**model), dp=dp, pp=pp, tp=tp, dp_overlap=overlap, **run)
    records = train(job)
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    plait.destroy_mesh()
    return dict(tokens_per_s=[r.tokens_per_s for r in records], peak_bytes=peak, device="cuda" if cuda else "cpu")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="GPT training throughput per layout")
    parser.add_argument("--layouts", nargs="+", default=["1,1,1", "2,1,1", "1,2,1", "1,1,2", "2,2,2"],
                        help="dp,pp,tp triples")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    model = dict(vocab_size=512, num_layers=args.layers, hidden=args.hidden, num_heads=4, seq_len=args.seq)
    run = dict(microbatches=args.microbatches, global_batch=args.global_batch, steps=args.steps, seed=0)
    rows = []
    for text in args.layouts:
        layout = tuple(int(v) for v in text.split(","))
        if len(layout) != 3:
            raise SystemExit(f"--layouts takes dp,pp,tp triples, got {text!r}")
        for overlap in ((True, False) if layout[0] > 1 else (True,)):
            world = layout[0] * layout[1] * layout[2]
            print(f"layout dp,pp,tp={layout} dp_overlap={overlap} on {world} processes ...", flush=True)
            results = run_ranks(bench_rank, world, layout, model, run, overlap, timeout=1800)
            per_step = [min(r["tokens_per_s"][i] for r in results) for i in range(1, args.steps)]
            rows.append(dict(dp=layout[0], pp=layout[1], tp=layout[2], dp_overlap=overlap,
                             tokens_per_s=statistics.median(per_step),
                             peak_mb=max(r["peak_bytes"] for r in results) / 2**20, device=results[0]["device"]))
    header = ["dp", "pp", "tp", "dp overlap", "tokens/s", "peak MB/rank", "device"]
    table = [[r["dp"], r["pp"], r["tp"], "on" if r["dp_overlap"] else "off", round(r["tokens_per_s"]),
              round(r["peak_mb"], 1), r["device"]] for r in rows]
    for line in [header, *table]:
        print("  ".join(str(c).rjust(12) for c in line))
    if not args.no_save:
        from plait.bench.common import write_result

        command = "plait bench train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        path = write_result("train", {"rows": rows, "model": model, "run": run,
                                      "table": {"columns": header, "rows": table}}, command.strip())
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
