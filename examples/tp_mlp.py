"""A tensor-parallel MLP on CPU processes, checked against the dense MLP.

    python examples/tp_mlp.py [--tp 2] [--tokens 256] [--hidden 256] [--steps 3]

Starts ``--tp`` processes (gloo), builds Column(GELU) -> Row from the same dense
``nn.Linear`` pair every rank holds, trains both for a few SGD steps on the same
data, prints the largest differences and whether they agree, then times a
forward+backward step of the dense MLP and of the parallel one per overlap mode.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import plait
from plait.launch import run_ranks

RTOL = 1e-5  # float32 agreement


def _time_step(step, repeats: int = 10) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats * 1e3


def demo_rank(rank: int, world: int, tokens: int, hidden: int, steps: int) -> dict:
    mesh = plait.init_mesh(tp=world)
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)
    report: dict = {"losses": [], "tp": world}
    modes = {}
    for overlap in ("none", "chunked"):
        col = plait.ColumnParallelLinear.from_linear(fc1, activation="gelu", overlap=overlap)
        row = plait.RowParallelLinear.from_linear(fc2, overlap=overlap)
        modes[overlap] = (col, row)

    # Train the dense pair and the chunked parallel pair side by side.
    col, row = modes["chunked"]
    dense_opt = torch.optim.SGD([*fc1.parameters(), *fc2.parameters()], lr=0.05)
    par_opt = torch.optim.SGD([*col.parameters(), *row.parameters()], lr=0.05)
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(steps):
        x = torch.randn(tokens, hidden, generator=gen)
        target = torch.randn(tokens, hidden, generator=gen)
        dense_out, par_out = fc2(F.gelu(fc1(x))), row(col(x))
        worst = max(worst, ((par_out - dense_out).abs().max() / dense_out.abs().max()).item())
        dense_loss, par_loss = F.mse_loss(dense_out, target), F.mse_loss(par_out, target)
        for opt, loss in ((dense_opt, dense_loss), (par_opt, par_loss)):
            opt.zero_grad()
            loss.backward()
            opt.step()
        report["losses"].append((dense_loss.item(), par_loss.item()))
    full_fc2 = row.to_linear()
    worst_weight = ((full_fc2.weight - fc2.weight).abs().max() / fc2.weight.abs().max()).item()
    report["max_rel_diff_output"], report["max_rel_diff_weight"] = worst, worst_weight

    # Timing: one forward+backward of each.
    x = torch.randn(tokens, hidden, generator=gen, requires_grad=True)
    if rank == 0:
        report["dense_ms"] = _time_step(lambda: fc2(F.gelu(fc1(x))).sum().backward())
    mesh.tp_comm.barrier()
    for overlap, (col, row) in modes.items():
        mesh.tp_comm.barrier()
        report[f"{overlap}_ms"] = _time_step(lambda: row(col(x)).sum().backward())
    plait.destroy_mesh()
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel processes (default 2)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"plait demo: MLP (Column -> GELU -> Row), hidden {args.hidden}, FFN {4 * args.hidden}, "
          f"{args.tokens} tokens, float32, on {args.tp} CPU processes (gloo)", flush=True)
    start = time.perf_counter()
    report = run_ranks(demo_rank, args.tp, args.tokens, args.hidden, args.steps)[0]
    for step, (dense, par) in enumerate(report["losses"], 1):
        print(f"  step {step}: loss dense {dense:.6f}   tensor-parallel {par:.6f}")
    ok = report["max_rel_diff_output"] < RTOL and report["max_rel_diff_weight"] < RTOL
    print(f"  largest relative difference: outputs {report['max_rel_diff_output']:.1e}, "
          f"weights after {args.steps} steps {report['max_rel_diff_weight']:.1e}")
    print(f"  {'MATCH' if ok else 'MISMATCH'}: the tensor-parallel MLP "
          f"{'equals' if ok else 'differs from'} the dense MLP (float32, rtol {RTOL:g})")
    print(f"  forward+backward per step: dense (1 process) {report['dense_ms']:.2f} ms | "
          f"TP={args.tp} overlap=none {report['none_ms']:.2f} ms | overlap=chunked {report['chunked_ms']:.2f} ms")
    print(f"  done in {time.perf_counter() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
