"""Serving benchmark: plait's engine and server against transformers and DeepSpeed on the same model, side by side.

    plait bench serve [--layers 8 --hidden 1024 --heads 16 --kv-heads 4 --vocab 32000]
                      [--prompt 128 --new 64 --clients 1 8 16 --tp 1 2 --dp 2 --pp 2 --runs 5]
                      [--peer-tp 2 --peer-batch 1 8 --hf-threads 1 2 --server-max-batch 8]

A Llama of the given shape with random weights (float32) is written to a temporary
directory (or ``--model DIR`` is used). For each number of concurrent clients C, C random
prompts of ``--prompt`` tokens each generate exactly ``--new`` tokens (greedy, EOS ignored);
every process runs one torch thread per rank:

- **plait** (tp in ``--tp``, pp=1): the engine in-process, all C requests arriving at once and
  served with continuous batching;
- **plait serve (HTTP)** dp=1 and each ``--dp``: ``plait serve`` as a subprocess with D replicas
  (tp=1) behind its router, driven by C concurrent streaming HTTP clients (bench/_serve_http.py);
- **plait pp=P** (each ``--pp`` value, tp=1): one replica of P pipeline stages, the running
  requests split into P slot groups that are in flight together (pipelined decode);
- **transformers TP** and **DeepSpeed AutoTP** (when installed) at tp=``--peer-tp``, when C is in
  ``--peer-batch``: the C prompts as one batch of ``generate`` (bench/_serve_peers.py);
- **transformers generate** in one process (one row per ``--hf-threads`` value): the C requests
  one after another, the sequential baseline.

Load scenarios (bench/_serve_load.py; plait's engine at tp=``--load-tp`` in ``--load-dtype``, each request
generating ``--load-new`` tokens, every contender with a fresh engine):

- **plait prefix cache** / **plait no prefix cache**: ``--prefix-requests`` requests sharing a
  ``--shared-prefix``-token system prompt (and a ``--prefix-suffix``-token suffix each), all at once, a step
  budget of ``--step-tokens``;
- **plait mixed chunked** / **plait mixed whole prompts**: ``--mixed-clients`` closed-loop clients, each
  sending ``--mixed-per-client`` requests with prompts of ``--mixed-lengths`` tokens (uniform), prefilled in
  chunks beside the decodes (a step budget of ``--mixed-step-tokens``, decodes included), or whole;
- **plait batch 1 (load)**: one request alone, the TPOT the mixed load is held against;
- **plait decodes only (load)**: each mixed client's first prompt, all prefilled in the first step, then
  only decodes: the TPOT of the same batch of decodes with no prefill beside them.

Their rows name the dtype; their gaps between consecutive tokens (p99, a stall shows there) and the KV-cache
memory per held token go to ``load`` in the JSON.

Time to first token (TTFT) and time per output token after the first (TPOT) are p50 and p99
over requests and runs (after ``--warmup`` runs); output tokens/s and requests/s use the
median run's wall. ``same_tokens`` says whether a contender's greedy tokens equal plait's at the
largest tp. The JSON (bench/results/, with the machine's load) also holds ``targets``: the
ratios issue #13 asks for (see :func:`targets`). A table is printed and a PNG written.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Optional

import torch

from plait.bench import _serve_http as serve_http
from plait.bench import _serve_load as serve_load
from plait.bench._comm_deepspeed import available as deepspeed_available
from plait.bench._serve_peers import peer_rank, transformers_run
from plait.bench.common import command_line, print_table, save_plot, transformers_tp_available, write_result
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
        self.tokens: dict[str, list[int]] = {r.rid: [] for r in self.requests}
        self.sent = False
        self.start = 0.0

    def poll(self, block: bool) -> list[tuple]:
        if self.sent:
            return []
        self.sent, self.start = True, time.perf_counter()
        return [("submit", r) for r in self.requests] + [("stop",)]

    def emit(self, events) -> None:
        serve_load.record_tokens(self.times, self.tokens, events)


def plait_rank(rank: int, world: int, tp: int, directory: str, prompts: list[list[int]], new: int, runs: int,
               warmup: int, pp: int = 1) -> Optional[dict]:
    import plait
    from plait.serve import Engine

    plait.init_mesh(pp=pp, tp=tp)
    model = plait.from_pretrained(directory, plait.current_mesh(), dtype=torch.float32)
    engine = Engine(model, max_batch=len(prompts), max_queue=0, max_len=len(prompts[0]) + new + 1, eos=())
    ttft, tpot, walls, tokens = [], [], [], []
    for run in range(warmup + runs):
        source = _TimedSource(prompts, new) if engine.is_leader else None
        engine.run(source)
        if source is None or run < warmup:
            continue
        tokens = [source.tokens[str(i)] for i in range(len(prompts))]
        end = max(t[-1] for t in source.times.values())
        walls.append(end - source.start)
        for times in source.times.values():
            ttft.append(times[0] - source.start)
            tpot.append((times[-1] - times[0]) / (len(times) - 1))
    plait.destroy_mesh()
    return dict(ttft=ttft, tpot=tpot, walls=walls, tokens=tokens) if engine.is_leader else None


def _row(name: str, tp: int, dp: int, clients: int, new: int, r: dict, same_tokens) -> list:
    wall = statistics.median(r["walls"])
    return [name, tp, dp, clients, round(_pct(r["ttft"], 0.5) * 1e3, 1), round(_pct(r["ttft"], 0.99) * 1e3, 1),
            round(_pct(r["tpot"], 0.5) * 1e3, 2), round(_pct(r["tpot"], 0.99) * 1e3, 2),
            round(clients * new / wall, 1), round(clients / wall, 3), same_tokens]


def _contenders(args, directory: str, clients: int, prompts: list[list[int]]):
    """(name, tp, dp, result) of every contender at ``clients``, in order, each as soon as it has run; a result
    holds ``ttft``, ``tpot`` (per request), ``walls`` (per run) and the last run's ``tokens``."""
    timing = (args.new, args.runs, args.warmup)
    for tp in args.tp:
        yield "plait", tp, 1, run_ranks(plait_rank, tp, tp, directory, prompts, *timing, timeout=3600)[0]
    for pp in [p for p in args.pp if p > 1]:
        yield f"plait pp={pp}", 1, 1, run_ranks(plait_rank, pp, 1, directory, prompts, *timing, pp, timeout=3600)[0]
    if not args.no_http and serve_http.available():
        for dp in dict.fromkeys([1, *args.dp]):
            if clients % dp == 0:
                with serve_http.serving(directory, dp, 1, args.server_max_batch, args.prompt + args.new + 1) as url:
                    yield "plait serve (HTTP)", 1, dp, serve_http.drive(url, prompts, *timing)
    if clients in args.peer_batch:
        if transformers_tp_available("transformers TP"):
            yield "transformers TP", args.peer_tp, 1, run_ranks(peer_rank, args.peer_tp, "transformers_tp",
                                                                directory, prompts, *timing, timeout=3600)[0]
        if not args.no_deepspeed and deepspeed_available():
            yield "DeepSpeed AutoTP", args.peer_tp, 1, run_ranks(peer_rank, args.peer_tp, "deepspeed_autotp",
                                                                 directory, prompts, *timing, timeout=3600)[0]
    for threads in [] if args.no_transformers else args.hf_threads:
        yield (f"transformers generate ({threads} threads)", 1, 1,
               transformers_run(directory, prompts, *timing, threads))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="plait bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="transformers Llama-family directory (default: make one)")
    for name, default in (("layers", 8), ("hidden", 1024), ("heads", 16), ("kv-heads", 4), ("vocab", 32000),
                          ("ffn", 2816), ("prompt", 128), ("new", 64), ("runs", 5), ("warmup", 1)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="TP sizes of plait's engine")
    parser.add_argument("--dp", type=int, nargs="+", default=[2],
                        help="replica counts of plait serve besides dp=1 (through its HTTP router)")
    parser.add_argument("--pp", type=int, nargs="+", default=[],
                        help="pipeline stages to run besides pp=1 (tp=1, one 'plait pp=P' row each)")
    parser.add_argument("--server-max-batch", type=int, default=8, help="plait serve --max-batch (default 8)")
    parser.add_argument("--peer-tp", type=int, default=2, help="TP size of transformers TP and DeepSpeed AutoTP")
    parser.add_argument("--peer-batch", type=int, nargs="+", default=[1, 8],
                        help="client counts at which the TP peers run (all clients in one batch)")
    parser.add_argument("--hf-threads", type=int, nargs="+", default=[1, 2],
                        help="torch threads of the transformers process (one row each)")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers generate (1 process)")
    parser.add_argument("--no-http", action="store_true", help="skip plait serve through HTTP")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeed AutoTP")
    parser.add_argument("--shared-prefix", type=int, default=1024, help="system prompt tokens (0: no such run)")
    parser.add_argument("--prefix-requests", type=int, default=32)
    parser.add_argument("--prefix-suffix", type=int, default=32)
    parser.add_argument("--mixed-clients", type=int, default=16, help="closed-loop clients (0: no mixed load)")
    parser.add_argument("--mixed-lengths", type=int, nargs=2, default=[64, 2048], metavar=("MIN", "MAX"))
    parser.add_argument("--mixed-per-client", type=int, default=2)
    parser.add_argument("--load-new", type=int, default=32, help="tokens each load request generates")
    parser.add_argument("--load-tp", type=int, default=None, help="TP size of the load runs (default: max --tp)")
    parser.add_argument("--load-dtype", default="auto", help="dtype of the load runs (default auto: see plait serve)")
    parser.add_argument("--step-tokens", type=int, default=512,
                        help="the engine's step budget in the shared prefix runs and batch 1")
    parser.add_argument("--mixed-step-tokens", type=int, default=48,
                        help="the engine's step budget in the chunked mixed load (decodes count too)")
    args = parser.parse_args(argv)
    if (min(args.clients + args.tp + args.dp + args.pp + args.peer_batch + [args.runs, args.new - 1, args.prompt,
                                                                   args.peer_tp, args.server_max_batch]) < 1
            or args.warmup < 0):
        parser.error("sizes must be positive (--new at least 2)")
    rows, load = [], {}
    with tempfile.TemporaryDirectory(prefix="plait-bench-serve-") as tmp:
        directory = args.model or tmp
        if args.model is None:
            make_model(tmp, args.layers, args.hidden, args.heads, args.kv_heads, args.vocab, args.ffn)
        for clients in args.clients:
            prompts = _prompts(clients, args.prompt, args.vocab, seed=clients)
            done = list(_contenders(args, directory, clients, prompts))
            reference = next((r["tokens"] for name, tp, _, r in done if name == "plait" and tp == max(args.tp)))
            for name, tp, dp, r in done:
                same = "reference" if r["tokens"] is reference else r["tokens"] == reference
                rows.append(_row(name, tp, dp, clients, args.new, r, same))
            print_table(COLUMNS, rows[-len(done):])
        load_rows, load = load_scenarios(args, directory)
        rows += load_rows
    print()
    print_table(COLUMNS, rows)
    goals = targets(rows, max(args.tp), args.peer_tp, max(args.clients), max(args.dp))
    goals.update(load_targets(rows, load, args))
    for name, goal in goals.items():
        print(f"{name}: {goal}")
    shape = {k: getattr(args, k.replace("-", "_")) for k in ("layers", "hidden", "heads", "kv-heads", "vocab", "ffn",
                                                             "prompt", "new", "runs", "warmup", "server-max-batch")}
    path = write_result("serve", {"shape": shape, "table": {"columns": COLUMNS, "rows": rows}, "targets": goals,
                                  "load": load}, command_line("serve", argv))
    print(f"wrote {path}")
    save_plot(plot, rows, path.with_suffix(".png"))
    return 0


def load_scenarios(args, directory: str) -> tuple[list[list], dict]:
    """The rows of the load scenarios (see the module docstring) and their ``load`` record (gaps, KV memory)."""
    from plait.models.hf import load_config
    from plait.plan.memory import kv_bytes_per_token
    from plait.serve.options import resolve_dtype

    tp = args.load_tp or max(args.tp)
    dtype, why = resolve_dtype(args.load_dtype)
    config = load_config(directory)
    low, high = args.mixed_lengths
    runs = []                                          # (name, clients, prompts, engine options)
    if args.shared_prefix:
        prompts = serve_load.shared_prefix_prompts(args.prefix_requests, args.shared_prefix, args.prefix_suffix,
                                                   args.vocab, seed=7)
        for name, caching in (("plait prefix cache", True), ("plait no prefix cache", False)):
            runs.append((name, args.prefix_requests, prompts, dict(prefix_caching=caching,
                                                                    max_step_tokens=args.step_tokens)))
    if args.mixed_clients:
        prompts = serve_load.mixed_prompts(args.mixed_clients, args.mixed_per_client, (low, high), args.vocab, 8)
        runs.append(("plait batch 1 (load)", 1, serve_load.mixed_prompts(1, 1, ((low + high) // 2,) * 2,
                                                                           args.vocab, 9),
                     dict(max_step_tokens=args.step_tokens)))
        firsts = [client[:1] for client in prompts]     # every client's first prompt, all prefilled at once
        runs.append(("plait decodes only (load)", args.mixed_clients, firsts,
                     dict(max_step_tokens=sum(len(c[0]) for c in firsts) + args.mixed_clients)))
        runs.append(("plait mixed chunked", args.mixed_clients, prompts,
                     dict(max_step_tokens=args.mixed_step_tokens)))
        runs.append(("plait mixed whole prompts", args.mixed_clients, prompts,
                     dict(max_step_tokens=high + args.mixed_clients)))
    if not runs:
        return [], {}
    rows, load = [], {"tp": tp, "dtype": dtype, "dtype_choice": why, "gaps_ms_p99": {}, "kv_memory": {}}
    model_bytes = kv_bytes_per_token(config.num_hidden_layers, config.num_key_value_heads,
                                     config.hidden_size // config.num_attention_heads,
                                     torch.empty((), dtype=getattr(torch, dtype)).element_size())
    max_len = max(len(p) for _, _, prompts, _ in runs for client in prompts for p in client) + args.load_new + 1
    same = {}
    for name, clients, prompts, options in runs:
        results = run_ranks(serve_load.load_rank, tp, tp, directory, prompts, args.load_new, dtype, options, max_len,
                            timeout=7200)
        leader = results[0]
        requests = sum(len(client) for client in prompts)
        row = _row(f"{name}, {dtype}", tp, 1, clients, args.load_new, leader, None)
        row[COLUMNS.index("output_tokens_per_s")] = round(requests * args.load_new / leader["walls"][0], 1)
        row[COLUMNS.index("requests_per_s")] = round(requests / leader["walls"][0], 3)
        twin = same.setdefault(id(prompts), leader["tokens"])   # runs on the same prompts agree
        row[COLUMNS.index("same_tokens")] = "reference" if twin is leader["tokens"] else twin == leader["tokens"]
        rows.append(row)
        load["gaps_ms_p99"][name] = round(_pct(leader["gaps"], 0.99) * 1e3, 2) if leader["gaps"] else None
        load["kv_memory"][name] = serve_load.kv_ratio(leader, results, model_bytes)
        print_table(COLUMNS, [row])
    return rows, load


def load_targets(rows: list[list], load: dict, args) -> dict:
    """The load ratios issue #23 sets: TTFT with prefix caching against without (p50, at most 0.2), p99 TPOT of
    the chunked mixed load against batch 1 (at most 1.5), KV memory per held token against the model's
    bytes per token (mean over the mixed load's steps, at most 1.1); and, as references without a bound,
    the mixed load's p99 TPOT with whole-prompt prefill, the chunked mixed load's p99 TPOT against the same
    clients decoding with no prefill beside them (what chunking itself costs the decodes), and that
    decode-only TPOT against batch 1 (what batching the clients' decodes costs on this machine)."""
    if not load:
        return {}
    tp, prefix, clients = load["tp"], args.prefix_requests, args.mixed_clients

    def find(name: str, count: int) -> Optional[list]:
        return _find(rows, f"{name}, {load['dtype']}", tp, 1, count)

    batch1 = find("plait batch 1 (load)", 1)
    goals = {
        "ttft_prefix_cache_over_none": _ratio(find("plait prefix cache", prefix), find("plait no prefix cache", prefix),
                                              "ttft_ms_p50", 0.2, at_most=True),
        "tpot_p99_mixed_chunked_over_batch1": _ratio(find("plait mixed chunked", clients), batch1, "tpot_ms_p99", 1.5,
                                                     at_most=True, bottom_column="tpot_ms_p50"),
        "tpot_p99_mixed_whole_prompts_over_batch1": _ratio(find("plait mixed whole prompts", clients), batch1,
                                                           "tpot_ms_p99", None, at_most=True,
                                                           bottom_column="tpot_ms_p50"),
        "tpot_p99_mixed_chunked_over_decodes_only": _ratio(find("plait mixed chunked", clients),
                                                           find("plait decodes only (load)", clients),
                                                           "tpot_ms_p99", None, at_most=True,
                                                           bottom_column="tpot_ms_p50"),
        "tpot_decodes_only_over_batch1": _ratio(find("plait decodes only (load)", clients), batch1, "tpot_ms_p50",
                                                None, at_most=True),
    }
    kv = load["kv_memory"].get("plait mixed chunked")
    goals["kv_bytes_per_held_token_over_model"] = (
        {"value": kv["mean"], "target": 1.1, "met": kv["mean"] <= 1.1,
         "of": f"mean over {kv['steps']} steps of the chunked mixed load (max {kv['max']})"} if kv else
        {"value": None, "target": 1.1, "met": None, "why": "no mixed load ran"})
    return goals


def _find(rows: list[list], name: str, tp: int, dp: int, clients: int) -> Optional[list]:
    return next((r for r in rows if r[:4] == [name, tp, dp, clients]), None)


def _ratio(top: Optional[list], bottom: Optional[list], column: str, target: Optional[float], at_most: bool,
           bottom_column: Optional[str] = None) -> dict:
    """``top[column] / bottom[bottom_column or column]`` against ``target`` (an upper bound when ``at_most``, else
    a lower one; None: reported without a bound)."""
    if top is None or bottom is None:
        return {"value": None, "target": target, "met": None, "why": "a contender did not run"}
    under = bottom_column or column
    value = round(top[COLUMNS.index(column)] / bottom[COLUMNS.index(under)], 3)
    met = None if target is None else (value <= target if at_most else value >= target)
    of = f"{column}: {top[0]} tp={top[1]} dp={top[2]}, {top[3]} clients"
    return {"value": value, "target": target, "met": met,
            "of": f"{of} / {under}: {bottom[0]} tp={bottom[1]} dp={bottom[2]}, {bottom[3]} clients"}


def targets(rows: list[list], tp: int, peer_tp: int, clients: int, dp: int) -> dict:
    """The ratios issue #13 sets as targets, from the table's rows (value None where a contender is missing):
    plait's TPOT at batch 1 against the TP peers', plait's output tokens/s at the most clients against
    transformers generate serving them one after another (its best thread count), and the requests/s of
    ``dp`` replicas against one, both through plait serve's HTTP router."""
    sequential = [r for r in rows if r[0].startswith("transformers generate") and r[3] == clients]
    best_sequential = max(sequential, key=lambda r: r[COLUMNS.index("output_tokens_per_s")], default=None)
    plait_b1 = _find(rows, "plait", tp, 1, 1)
    return {
        "tpot_plait_b1_over_deepspeed_autotp": _ratio(plait_b1, _find(rows, "DeepSpeed AutoTP", peer_tp, 1, 1),
                                                      "tpot_ms_p50", 0.8, at_most=True),
        "tpot_plait_b1_over_transformers_tp": _ratio(plait_b1, _find(rows, "transformers TP", peer_tp, 1, 1),
                                                     "tpot_ms_p50", 0.6, at_most=True),
        "tokens_per_s_plait_over_sequential_transformers": _ratio(
            _find(rows, "plait", tp, 1, clients), best_sequential, "output_tokens_per_s", 4.0, at_most=False),
        "requests_per_s_http_dp_over_dp1": _ratio(_find(rows, "plait serve (HTTP)", 1, dp, clients),
                                                  _find(rows, "plait serve (HTTP)", 1, 1, clients),
                                                  "requests_per_s", 1.6, at_most=False),
    }


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
        names = [row[0].replace("transformers generate", "HF").replace(" ", "\n", 1) for row in mine]
        labels = [f"{name}\ntp={row[1]} dp={row[2]}" for name, row in zip(names, mine)]
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
           "output_tokens_per_s", "requests_per_s", "same_tokens"]

if __name__ == "__main__":
    raise SystemExit(main())
