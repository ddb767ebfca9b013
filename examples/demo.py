"""plait demo: train the reference GPT on DP 2 x PP 2 x TP 2 (8 CPU processes), then in one
process, and say whether the two agree.

    python examples/demo.py [--steps 10] [--schedule 1f1b]

Both runs use examples/train_gpt.py with the same seed, model and global batch;
the distributed one runs under torchrun. Losses must agree to 1e-5 relative
(float32), step by step.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TRAIN = Path(__file__).with_name("train_gpt.py")
RTOL = 1e-5


def run(title: str, command: list[str]) -> list[dict]:
    """Run one training job, echo its progress, return its per-step JSON records."""
    print(f"\n== {title}\n   {' '.join(command)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = []
    for line in proc.stdout:
        data = json.loads(line) if line.startswith("{") else None
        if data is None:
            print("   " + line.rstrip(), flush=True)
        elif data.get("summary"):
            print(f"   done: loss {data['first_loss']:.4f} -> {data['final_loss']:.4f}, "
                  f"{data['mean_tokens_per_s']:,.0f} tokens/s, {time.perf_counter() - start:.1f} s", flush=True)
        else:
            records.append(data)
            print(f"   step {data['step'] + 1}: loss {data['loss']:.6f}  ({data['tokens_per_s']:,.0f} tokens/s)",
                  flush=True)
    errors = proc.stderr.read()
    if proc.wait() != 0:
        print(errors[-4000:], file=sys.stderr)
        raise SystemExit(f"{title} failed (exit code {proc.returncode})")
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--schedule", default="1f1b")
    args = parser.parse_args(argv)
    common = [str(TRAIN), "--steps", str(args.steps), "--seed", "0", "--microbatches", "4", "--global-batch", "16",
              "--json"]
    print("plait demo: a GPT (4 layers, hidden 64) trained on a 2 x 2 x 2 (DP x PP x TP) mesh of CPU processes,\n"
          "then the same model in one process", flush=True)
    distributed = run("DP 2 x PP 2 x TP 2, 8 processes (gloo)",
                      [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "8", *common,
                       "--dp", "2", "--pp", "2", "--tp", "2", "--schedule", args.schedule])
    single = run("one process", [sys.executable, *common])
    worst = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(distributed, single))
    agree = len(distributed) == len(single) == args.steps and worst <= RTOL
    print(f"\n{'AGREE' if agree else 'DISAGREE'}: the 2x2x2 run's losses {'match' if agree else 'differ from'} the "
          f"one-process run's over {args.steps} steps (largest relative difference {worst:.1e}, tolerance {RTOL:g})")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
