"""``plait generate``: one prompt through a (pp, tp) layout, on local processes or under torchrun.

    plait generate --model DIR --tp 2 --prompt "the cat" --max-new-tokens 16 --json

Without torchrun (no ``RANK`` in the environment) it starts ``tp * pp`` local ranks with
:func:`plait.launch.run_ranks` (over several hosts: this host's share, with ``--nnodes``,
``--node-rank``, ``--master-addr``, ``--master-port`` as for ``plait train``; node 0 prints);
under torchrun each process is one rank and rank 0 prints. ``--json`` prints
``{"prompt_ids", "token_ids", "text", "finish_reason"}``; otherwise the text (or the ids
when the model directory has no tokenizer).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from ..nodes import add_node_options, node_from_args
from .options import add_model_options, nonnegative_float, nonnegative_int, positive_int, probability, resolve_dtype


def setup(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs the model directory's tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16, help="tokens to generate (default 16)")
    parser.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-k", type=nonnegative_int, default=0, help="keep the k likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass in (0, 1]")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    parser.add_argument("--json", action="store_true", help="print token ids and text as JSON")
    parser.add_argument("--tp-across-hosts", action="store_true",
                        help="allow TP groups that span hosts (refused by default)")
    add_node_options(parser)
    parser.set_defaults(run=run)


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None
    if not ids:
        raise ValueError("--prompt-ids is empty")
    return ids


def check_layout(directory: str, tp: int, pp: int) -> None:
    """ValueError when the model in ``directory`` cannot take the (pp, tp) layout (checked on the meta device)."""
    from ..config import ParallelConfig
    from ..models.hf import build_on_meta, load_config
    from ..parallel.apply import check_plan, model_shape
    from ..parallel.model import resolve_plan

    from ..parallel.families import FAMILIES, check_config, family

    config = load_config(directory)
    check_config(config)
    model = build_on_meta(config)
    plan = resolve_plan(model, None)
    if not family(plan.family).serves:
        raise ValueError(f"plait serves the {sorted(n for n, f in FAMILIES.items() if f.serves)} model families, "
                         f"not {plan.family!r}")
    ParallelConfig(pp=pp, tp=tp).check_model(model_shape(model, plan))   # the verdict parallelize gives
    check_plan(model, plan, tp)


def prepare(args: argparse.Namespace) -> dict:
    """Everything checked on the calling process before any rank starts: the prompt ids and sampling settings."""
    from .sampling import SamplingParams
    from .text import load_tokenizer
    from .worker import context_length
    from ..models.hf import load_config

    config = load_config(args.model)
    check_layout(args.model, args.tp, args.pp)
    tokenizer = load_tokenizer(args.model)
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer; give the prompt as --prompt-ids")
        ids = tokenizer(args.prompt, add_special_tokens=True)["input_ids"]
    else:
        ids = parse_ids(args.prompt_ids)
    vocab = config.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise ValueError(f"prompt token ids must lie in [0, {vocab})")
    context = context_length(config)
    if args.max_len is not None and args.max_len > context:
        raise ValueError(f"--max-len {args.max_len} exceeds the model's context of {context}")
    context = args.max_len or context
    if len(ids) > context:
        raise ValueError(f"the prompt has {len(ids)} tokens, more than the context of {context}")
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    return dict(model=args.model, ids=ids, params=params, dtype=resolve_dtype(args.dtype)[0], max_len=args.max_len,
                tokenizer=tokenizer is not None, tp_across_hosts=args.tp_across_hosts)


def generate_rank(rank: int, world: int, pp: int, tp: int, job: dict) -> Optional[dict]:
    """One rank's part of ``plait generate``; the result (on every rank) as a JSON-able dict."""
    import torch

    import plait
    from .engine import Engine
    from .text import load_tokenizer

    mesh = plait.init_mesh(plait.ParallelConfig(pp=pp, tp=tp, tp_across_hosts=job["tp_across_hosts"]))
    try:
        model = plait.from_pretrained(job["model"], mesh, dtype=getattr(torch, job["dtype"]))
        tokenizer = load_tokenizer(job["model"]) if job["tokenizer"] else None
        engine = Engine(model, max_batch=1, max_queue=1, max_len=job["max_len"], tokenizer=tokenizer)
        done = engine.generate([job["ids"]], [job["params"]])[0]
    except Exception as exc:
        lost = None if isinstance(exc, ValueError) else mesh.host_lost(exc)
        plait.destroy_mesh(barrier=False)
        if lost is not None:
            raise lost from exc
        raise
    plait.destroy_mesh()
    return dict(prompt_ids=job["ids"], token_ids=done.token_ids, text=done.text, finish_reason=done.finish_reason)


def run(args: argparse.Namespace) -> int:
    try:
        job = prepare(args)
        node = node_from_args(args)
        node.local_ranks(args.tp * args.pp)
    except ValueError as err:
        print(f"plait generate: error: {err}", file=sys.stderr)
        return 2
    if "RANK" in os.environ:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != args.tp * args.pp:
            print(f"plait generate: error: torchrun started {world} processes but --tp {args.tp} x --pp {args.pp} "
                  f"= {args.tp * args.pp}", file=sys.stderr)
            return 2
        result = generate_rank(int(os.environ["RANK"]), world, args.pp, args.tp, job)
        if int(os.environ["RANK"]) != 0:
            return 0
    else:
        from ..launch import run_ranks

        world = args.tp * args.pp
        threads = max(1, (os.cpu_count() or 1) // len(node.local_ranks(world)))
        result = run_ranks(generate_rank, world, args.pp, args.tp, job, timeout=3600,
                           threads_per_rank=threads, node=node)[0]
        if node.node_rank != 0:
            return 0                   # node 0 prints the answer
    if args.json:
        print(json.dumps(result))
    else:
        print(result["text"] if job["tokenizer"] else " ".join(map(str, result["token_ids"])))
    return 0
