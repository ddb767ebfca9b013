"""``plait serve``: an OpenAI-compatible server of a transformers model on DP x PP x TP local processes.

    plait serve --model DIR --tp 2 --pp 1 --dp 2 --port 8000

Every option is checked, and the layout against the model, before any process starts.
The server listens once every replica has loaded the model. SIGTERM (or Ctrl-C) stops
accepting, lets in-flight requests finish, stops every rank and exits 0.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Optional

from .options import (BLOCK_SIZE, MAX_STEP_TOKENS, add_model_options, gib, nonnegative_int, port, positive_int,
                      resolve_dtype, seconds)


def _terminate_startup(signum, frame) -> None:
    raise SystemExit(0)


def setup(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--dp", type=positive_int, default=1, help="replicas, each a tp x pp group (default 1)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=port, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--max-batch", type=positive_int, default=8,
                        help="requests running (decoded together) per replica (default 8)")
    kv = parser.add_mutually_exclusive_group()
    kv.add_argument("--kv-blocks", type=positive_int, default=None,
                    help="KV-cache blocks per rank (default: --max-batch requests at --max-len)")
    kv.add_argument("--kv-memory", type=gib, default=None, metavar="GIB",
                    help="KV-cache memory per rank in GiB; as many blocks as fit on the rank that fits fewest")
    parser.add_argument("--block-size", type=positive_int, default=BLOCK_SIZE,
                        help=f"positions per KV-cache block (default {BLOCK_SIZE})")
    parser.add_argument("--max-step-tokens", type=positive_int, default=MAX_STEP_TOKENS,
                        help="new tokens per step at most; longer prompts are prefilled in chunks beside the "
                             f"running decodes (default {MAX_STEP_TOKENS})")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="do not share the KV-cache blocks of equal prompt prefixes")
    parser.add_argument("--max-queue", type=nonnegative_int, default=64,
                        help="requests waiting per replica beyond the batch; more get 503 (default 64)")
    parser.add_argument("--request-timeout", type=seconds, default=600.0,
                        help="deadline of each request in seconds; a request's own 'timeout' field may set a "
                             "shorter one (default 600)")
    parser.add_argument("--startup-timeout", type=seconds, default=600.0,
                        help="seconds the replicas may take to load the model (default 600)")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="names clients may send as 'model'; the first is the one /v1/models lists first "
                             "(default: the --model string as given, and its directory's name)")
    parser.set_defaults(run=run)


def served_names(model: str, given: Optional[list[str]]) -> tuple[str, ...]:
    """The names the API answers to: ``--served-model-name`` when given, else the ``--model`` string as the
    user typed it and its directory's name (vLLM's convention, plus the short name)."""
    if given:
        return tuple(dict.fromkeys(given))
    return tuple(dict.fromkeys([model, Path(model).resolve().name]))


def run(args: argparse.Namespace) -> int:
    from ..models.hf import load_config
    from .generate import check_layout
    from .text import load_tokenizer
    from .worker import context_length

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as err:
        print(f"plait serve: error: needs the serve extra ({err.name} is missing): pip install 'plait[serve]'",
              file=sys.stderr)
        return 2
    try:
        config = load_config(args.model)
        check_layout(args.model, args.tp, args.pp)
        limit = context_length(config)
        if args.max_len is not None and args.max_len > limit:
            raise ValueError(f"--max-len {args.max_len} exceeds the model's context of {limit}")
        tokenizer = load_tokenizer(args.model)
    except ValueError as err:
        print(f"plait serve: error: {err}", file=sys.stderr)
        return 2
    import torch

    from .api import ServedModel, create_app
    from .router import Router

    dtype, why = resolve_dtype(args.dtype)
    job = dict(model=args.model, tp=args.tp, pp=args.pp, dtype=dtype, max_batch=args.max_batch,
               max_queue=args.max_queue, max_len=args.max_len, kv_blocks=args.kv_blocks,
               kv_memory=None if args.kv_memory is None else args.kv_memory * 2 ** 30, block_size=args.block_size,
               max_step_tokens=args.max_step_tokens, prefix_caching=not args.no_prefix_caching)
    served = ServedModel(served_names(args.model, args.served_model_name), tokenizer, args.max_len or limit,
                         config.vocab_size, args.request_timeout,
                         {"dtype": dtype, "dtype_choice": why, "device": "cuda" if torch.cuda.is_available() else "cpu",
                          "tp": args.tp, "pp": args.pp, "dp": args.dp})
    router = Router(job, args.dp)
    signal.signal(signal.SIGTERM, _terminate_startup)
    try:
        router.start(args.startup_timeout)
    except RuntimeError as err:
        print(f"plait serve: error: {err}", file=sys.stderr)
        return 1
    except SystemExit:
        router.close(timeout_s=5)
        return 0
    # uvicorn catches SIGTERM, shuts down gracefully, then re-raises the signal to the handler it found: make
    # that one a no-op so a drained server exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        app = create_app(router, served)
        print(f"plait serve: {served.name} on http://{args.host}:{args.port} (dp={args.dp} pp={args.pp} "
              f"tp={args.tp}, {served.info['device']}, {dtype}: {why})", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=int(args.request_timeout) + 5)
    finally:
        router.close()
    return 0
