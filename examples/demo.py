"""plait demo: train plait's GPT on real text on DP 2 x PP 2 x TP 2 (8 CPU processes), then in one
process, and say whether the two agree.

    python examples/demo.py [--steps 12] [--schedule 1f1b] [--workdir DIR]

Nothing is downloaded. The text is this repository's own (README, docs, Python sources):

1. a byte-level BPE tokenizer is trained on it with the ``tokenizers`` library and saved as a
   transformers tokenizer directory;
2. ``plait data prepare`` tokenizes the text into a token file;
3. ``plait train --gpt gpt-tiny,vocab=N`` trains plait's GPT from the same seed twice: on
   (dp, pp, tp) = (2, 2, 2) and in one process, with the same data, batches and schedule.

The losses must agree to 1e-5 relative (float32), step by step.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
VOCAB = 512
EOS = "<|endoftext|>"


def corpus() -> list[Path]:
    """The repository's own text: README, docs and the Python sources of plait."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "python").rglob("*.py"))]
    return [f for f in files if f.is_file()]


def train_tokenizer(files: list[Path], out: Path) -> int:
    """A byte-level BPE tokenizer of ``VOCAB`` ids trained on ``files``, saved for transformers; its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(f) for f in files], trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)
    wrapped.save_pretrained(str(out))
    return len(wrapped)


def plait(*args: str) -> list[str]:
    return [sys.executable, "-m", "plait", *args]


def run(title: str, command: list[str]) -> list[dict]:
    """Run one training job, echo its progress, return its per-step JSON records."""
    print(f"\n== {title}\n   {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = []
    for line in proc.stdout:
        data = json.loads(line) if line.startswith("{") else None
        if data is None:
            print("   " + line.rstrip(), flush=True)
        elif data.get("summary"):
            print(f"   done: loss {data['first_loss']:.4f} -> {data['final_loss']:.4f}, eval loss "
                  f"{data['eval_loss']:.4f}, {data['tokens_per_s']:,.0f} tokens/s, "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
        else:
            records.append(data)
            print(f"   step {data['step']:3d}: loss {data['loss']:.6f}  ({data['tokens_per_s']:,.0f} tokens/s)",
                  flush=True)
    errors = proc.stderr.read()
    if proc.wait() != 0:
        print(errors[-4000:], file=sys.stderr)
        raise SystemExit(f"{title} failed (exit code {proc.returncode})")
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--workdir", help="keep the tokenizer and token file here (default: a temporary directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="plait-demo-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = corpus()
        print(f"plait demo: a BPE tokenizer and plait's GPT trained on this repository's own text "
              f"({len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB)", flush=True)
        vocab = train_tokenizer(files, work / "tokenizer")
        print(f"   tokenizer: {vocab} ids, saved in {work / 'tokenizer'}", flush=True)
        data = work / "data.bin"
        subprocess.run(plait("data", "prepare", "--tokenizer", str(work / "tokenizer"), "--input",
                             *map(str, files), "--output", str(data)), check=True, stderr=subprocess.DEVNULL)
        print(f"   token file: {data} ({data.stat().st_size // 2:,} tokens)", flush=True)
        job = ["train", "--gpt", f"gpt-tiny,vocab={vocab}", "--data", str(data), "--seq", "64",
               "--global-batch", "16", "--microbatches", "4", "--steps", str(args.steps), "--lr", "3e-3",
               "--warmup", "2", "--shuffle", "--eval-fraction", "0.02", "--seed", "0", "--json"]
        distributed = run("DP 2 x PP 2 x TP 2, 8 processes (gloo)",
                          plait(*job, "--dp", "2", "--pp", "2", "--tp", "2", "--schedule", args.schedule))
        single = run("one process", plait(*job))
    worst = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(distributed, single))
    agree = len(distributed) == len(single) == args.steps and worst <= RTOL
    print(f"\n{'AGREE' if agree else 'DISAGREE'}: the 2x2x2 run's losses {'match' if agree else 'differ from'} the "
          f"one-process run's over {args.steps} steps (largest relative difference {worst:.1e}, tolerance {RTOL:g})")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
