"""Train a small model with plait's pipeline engine, on CPU processes or under torchrun.

    python examples/train_pipeline.py [--pp 4] [--schedule 1f1b] [--virtual 1] [--microbatches 8]
                                      [--steps 20] [--trace DIR]
    torchrun --nproc-per-node 4 examples/train_pipeline.py --pp 4 --schedule zb1p

The model is a stack of MLP blocks cut into ``pp * virtual`` stages; each rank builds
only its own stages (same seed everywhere, so the split model equals the whole one).
It fits a fixed random linear map with SGD and prints the loss, which every rank gets.
With ``--trace DIR`` the last step's timeline goes to DIR/pipeline.json (open it in
https://ui.perfetto.dev) and DIR/pipeline.png (when matplotlib is installed).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import plait
from plait.launch import run_ranks
from plait.pp import build_schedule, chrome_trace, gantt_png, measured_bubble


class Block(nn.Module):
    """x + MLP(x): a residual block, so a deep stack still trains quickly."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


def stage_module(stage: int, width: int) -> nn.Module:
    torch.manual_seed(1000 + stage)  # each stage from its own seed: any rank can build any stage
    return Block(width)


def train(rank: int, world: int, args: argparse.Namespace) -> list[float]:
    mesh = plait.init_mesh(pp=args.pp)
    schedule = build_schedule(args.schedule, args.pp, args.microbatches, args.virtual)
    stages = [stage_module(s, args.width) for s in schedule.stages_of(mesh.pp_rank)]
    engine = plait.PipelineEngine(stages, mesh, schedule, loss_fn=F.mse_loss)
    optimizer = torch.optim.SGD(engine.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    target_map = torch.randn(args.width, args.width, generator=gen) / args.width ** 0.5
    losses = []
    for step in range(args.steps):
        x = torch.randn(args.batch, args.width, generator=gen)
        loss = engine.train_step(x, x @ target_map)  # inputs used by the first stage, targets by the last
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if mesh.pp_rank == 0 and (step % max(1, args.steps // 10) == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.5f}", flush=True)
    events = engine.gather_timeline()
    if mesh.pp_rank == 0:
        sim = schedule.simulate()
        print(f"{args.schedule} p={args.pp} v={args.virtual} m={args.microbatches}: last step's bubble "
              f"{measured_bubble(events, args.pp)['bubble_fraction']:.3f} measured, {sim.bubble_fraction:.3f} "
              f"simulated with unit costs; peak activations {engine.peak_activations} (simulated "
              f"{sim.peak_activations[0]})")
        if args.trace:
            out = Path(args.trace)
            out.mkdir(parents=True, exist_ok=True)
            chrome_trace(events, out / "pipeline.json")
            png = gantt_png(events, out / "pipeline.png", title=f"{args.schedule}, last step")
            print(f"wrote {out / 'pipeline.json'}" + (f" and {png}" if png else ""))
    plait.destroy_mesh()
    return losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--schedule", default="1f1b", choices=plait.pp.SCHEDULES)
    parser.add_argument("--virtual", type=int, default=1, help="stages per rank (2+ for interleaved)")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--trace", default=None, help="directory for the last step's Chrome trace and Gantt PNG")
    args = parser.parse_args(argv)
    if args.schedule == "interleaved" and args.virtual < 2:
        args.virtual = 2
    if "RANK" in os.environ:  # started by torchrun
        train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
    else:
        losses = run_ranks(train, args.pp, args, timeout=1800)
        assert all(run == losses[0] for run in losses), "every rank returns the same loss"
        if losses[0][-1] >= losses[0][0]:
            print("warning: the loss did not go down", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
