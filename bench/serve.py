"""Serving benchmark: plait's engine against transformers ``generate`` on the same model, side by side.

    plait bench serve [--layers 8 --hidden 1024 --heads 16 --kv-heads 4 --vocab 32000]
                      [--prompt 128 --new 64 --clients 1 16 --tp 1 2 --dp 1 2 --pp 2 --runs 5]

A Llama of the given shape with random weights (float32) is written to a temporary
directory (or ``--model DIR`` is used). For each number of concurrent clients C:

- **plait** (tp in ``--tp``, pp=1, one thread per rank): C requests of ``--prompt`` random
  tokens arrive at once and are served with continuous batching, each generating exactly
  ``--new`` tokens (EOS ignored); time to first token (TTFT) and time per output token
  after the first (TPOT) per request, output tokens/s and requests/s over the run;
- **plait dp=D**: D independent replicas (tp=1) serving C/D requests each at the same time;
- **plait pp=P** (each ``--pp`` value, tp=1): one replica of P pipeline stages, the running
  requests split into P slot groups that are in flight together (pipelined decode);
- **transformers** ``generate`` in one process (one row per ``--hf-threads`` value): the same C
  requests one after another (greedy, ``min_new_tokens`` = ``max_new_tokens``), TTFT from a
  one-token generate, TPOT from the rest.

Figures are p50 and p99 over requests and runs (after ``--warmup`` runs). The JSON goes to
bench/results/ with the machine's load; a table is printed.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from typing import Optional

import torch

from plait.bench.common import command_line, print_table, save_plot, write_result
from plait.launch import run_ranks


def make_model(directory: str, layers: int, hidden: int, heads: int, kv_heads: int, vocab: int, ffn: int) -> None:
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                           tie_word_embeddings=False)
    T.AutoModelForCausalLM.from_config(config).float().save_pretrained(directory)


def _prompts(clients: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (clients, length), generator=gen).tolist()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


class _TimedSource:
    """Submits every request at once, then drains; records when each request's tokens arrive."""

    def __init__(self, prompts: list[list[int]], new: int) -> None:
        from plait.serve import Request, SamplingParams

        self.requests = [Request(str(i), p, SamplingParams(max_tokens=new, ignore_eos=True))
                         for i, p in enumerate(prompts)]
        self.times: dict[str, list[float]] = {r.rid: [] for r in self.requests}
        self.sent = False
        self.start = 0.0

    def poll(self, block: bool) -> list[tuple]:
        if self.sent:
            return []
        self.sent, self.start = True, time.perf_counter()
        return [("submit", r) for r in self.requests] + [("stop",)]

    def emit(self, events) -> None:
        now = time.perf_counter()
        for event in events:
            if event.token is not None:
                self.times[event.rid].append(now)


def plait_rank(rank: int, world: int, tp: int, directory: str, prompts: list[list[int]], new: int, runs: int,
               warmup: int, pp: int = 1) -> Optional[dict]:
    import plait
    from plait.serve import Engine

    plait.init_mesh(pp=pp, tp=tp)
    model = plait.from_pretrained(directory, plait.current_mesh(), dtype=torch.float32)
    engine = Engine(model, max_batch=len(prompts), max_queue=0, max_len=len(prompts[0]) + new + 1, eos=())
    ttft, tpot, walls = [], [], []
    for run in range(warmup + runs):
        source = _TimedSource(prompts, new) if engine.is_leader else None
        engine.run(source)
        if source is None or run < warmup:
            continue
        end = max(t[-1] for t in source.times.values())
        walls.append(end - source.start)
        for times in source.times.values():
            ttft.append(times[0] - source.start)
            tpot.append((times[-1] - times[0]) / (len(times) - 1))
    plait.destroy_mesh()
    return dict(ttft=ttft, tpot=tpot, walls=walls) if engine.is_leader else None


def transformers_run(directory: str, prompts: list[list[int]], new: int, runs: int, warmup: int,
                     threads: int) -> dict:
    import transformers as T

    torch.set_num_threads(threads)
    model = T.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ttft, tpot, walls = [], [], []
    for run in range(warmup + runs):
        wall = 0.0
        for prompt in prompts:
            ids = torch.tensor([prompt])
            kwargs = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, **kwargs)
            first = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
            total = time.perf_counter() - start
            wall += total
            if run >= warmup:
                ttft.append(first)
                tpot.append((total - first) / (new - 1))
        if run >= warmup:
            walls.append(wall)
    return dict(ttft=ttft, tpot=tpot, walls=walls)


def _row(name: str, tp: int, dp: int, clients: int, new: int, r: dict) -> list:
    wall = statistics.median(r["walls"])
    return [name, tp, dp, clients, round(_pct(r["ttft"], 0.5) * 1e3, 1), round(_pct(r["ttft"], 0.99) * 1e3, 1),
            round(_pct(r["tpot"], 0.5) * 1e3, 2), round(_pct(r["tpot"], 0.99) * 1e3, 2),
            round(clients * new / wall, 1), round(clients / wall, 3)]


def _plait_dp(dp: int, directory: str, prompts, new: int, runs: int, warmup: int) -> dict:
    """``dp`` replicas (tp=1) at once, each with its share of the prompts; walls are the slowest replica's."""
    shares = [prompts[i::dp] for i in range(dp)]
    out: list[Optional[dict]] = [None] * dp

    def replica(i: int) -> None:
        out[i] = run_ranks(plait_rank, 1, 1, directory, shares[i], new, runs, warmup, timeout=3600)[0]

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(dp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merged = dict(ttft=[], tpot=[], walls=[max(w) for w in zip(*(r["walls"] for r in out))])
    for r in out:
        merged["ttft"] += r["ttft"]
        merged["tpot"] += r["tpot"]
    return merged


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="plait bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="transformers Llama-family directory (default: make one)")
    for name, default in (("layers", 8), ("hidden", 1024), ("heads", 16), ("kv-heads", 4), ("vocab", 32000),
                          ("ffn", 2816), ("prompt", 128), ("new", 64), ("runs", 5), ("warmup", 1)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dp", type=int, nargs="+", default=[2], help="replica counts to run besides dp=1")
    parser.add_argument("--pp", type=int, nargs="+", default=[],
                        help="pipeline stages to run besides pp=1 (tp=1, one 'plait pp=P' row each)")
    parser.add_argument("--hf-threads", type=int, nargs="+", default=[1, 2],
                        help="torch threads of the transformers process (one row each)")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args(argv)
    if min(args.clients + args.tp + args.dp + args.pp + [args.runs, args.new - 1, args.prompt]) < 1 or args.warmup < 0:
        parser.error("sizes must be positive (--new at least 2)")
    with tempfile.TemporaryDirectory(prefix="plait-bench-serve-") as tmp:
        directory = args.model or tmp
        if args.model is None:
            make_model(tmp, args.layers, args.hidden, args.heads, args.kv_heads, args.vocab, args.ffn)
        rows = []
        for clients in args.clients:
            prompts = _prompts(clients, args.prompt, args.vocab, seed=clients)
            for tp in args.tp:
                r = run_ranks(plait_rank, tp, tp, directory, prompts, args.new, args.runs, args.warmup,
                              timeout=3600)[0]
                rows.append(_row("plait", tp, 1, clients, args.new, r))
                print_table(COLUMNS, rows[-1:])
            for dp in args.dp:
                if clients % dp == 0 and dp > 1:
                    rows.append(_row("plait", 1, dp, clients, args.new,
                                     _plait_dp(dp, directory, prompts, args.new, args.runs, args.warmup)))
                    print_table(COLUMNS, rows[-1:])
            for pp in [p for p in args.pp if p > 1]:
                r = run_ranks(plait_rank, pp, 1, directory, prompts, args.new, args.runs, args.warmup, pp,
                              timeout=3600)[0]
                rows.append(_row(f"plait pp={pp}", 1, 1, clients, args.new, r))
                print_table(COLUMNS, rows[-1:])
            for threads in [] if args.no_transformers else args.hf_threads:
                r = transformers_run(directory, prompts, args.new, args.runs, args.warmup, threads)
                rows.append(_row(f"transformers generate ({threads} threads)", 1, 1, clients, args.new, r))
                print_table(COLUMNS, rows[-1:])
    print()
    print_table(COLUMNS, rows)
    shape = {k: getattr(args, k.replace("-", "_")) for k in ("layers", "hidden", "heads", "kv-heads", "vocab", "ffn",
                                                             "prompt", "new", "runs", "warmup")}
    path = write_result("serve", {"shape": shape, "table": {"columns": COLUMNS, "rows": rows}},
                        command_line("serve", argv))
    print(f"wrote {path}")
    save_plot(plot, rows, path.with_suffix(".png"))
    return 0


def plot(rows: list[list], path) -> bool:
    """Time per output token (p50) and output tokens/s per contender, one panel per client count;
    False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    clients = sorted({row[3] for row in rows})
    fig, axes = plt.subplots(2, len(clients), figsize=(4.5 * len(clients), 6), squeeze=False)
    for col, count in enumerate(clients):
        mine = [row for row in rows if row[3] == count]
        labels = [f"{row[0].replace('transformers generate', 'HF')}\ntp={row[1]} dp={row[2]}" for row in mine]
        for ax, index, title in ((axes[0][col], 6, "time per output token p50 (ms)"),
                                 (axes[1][col], 8, "output tokens / s")):
            ax.bar(range(len(mine)), [row[index] for row in mine])
            ax.set_xticks(range(len(mine)), labels, fontsize=7)
            ax.set_title(f"{title}, {count} clients", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


COLUMNS = ["contender", "tp", "dp", "clients", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99",
           "output_tokens_per_s", "requests_per_s"]

if __name__ == "__main__":
    raise SystemExit(main())
