"""``plait serve``: an OpenAI-compatible server of a transformers model on DP x PP x TP processes.

    plait serve --model DIR --tp 2 --pp 1 --dp 2 --port 8000                 one host
    plait serve --model DIR --tp 2 --dp 1 --host 0.0.0.0 --port 8000         host a: router and a replica
    plait serve --model DIR --tp 2 --dp 1 --replica-of a:8000 --port 8001    host b: a replica for a's router

Every option is checked, and the layout against the model, before any process starts.
The server listens once every replica has loaded the model. Replica hosts
(``--replica-of``, :mod:`plait.serve.agent`) join the router when their replicas are up
and leave it when they stop or vanish (:mod:`plait.serve.remote`). SIGTERM (or Ctrl-C) stops
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
    parser.add_argument("--host", default=None,
                        help="address to listen on (default 127.0.0.1; with --replica-of, this host's address on the "
                             "route to the router). A router that replica hosts join must listen where they reach "
                             "it, e.g. 0.0.0.0")
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
    parser.add_argument("--replica-of", metavar="HOST:PORT", type=router_address, default=None,
                        help="serve as a replica host of the router at HOST:PORT (another host's plait serve): "
                             "start --dp replicas here and register them there")
    parser.add_argument("--advertise", metavar="ADDR", default=None,
                        help="with --replica-of: the address the router reaches this host on (default: --host, "
                             "or this host's address on the route to the router)")
    parser.set_defaults(run=run)


def served_names(model: str, given: Optional[list[str]]) -> tuple[str, ...]:
    """The names the API answers to: ``--served-model-name`` when given, else the ``--model`` string as the
    user typed it and its directory's name (vLLM's convention, plus the short name)."""
    if given:
        return tuple(dict.fromkeys(given))
    return tuple(dict.fromkeys([model, Path(model).resolve().name]))


def router_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` of --replica-of."""
    host, _, number = text.rpartition(":")
    if not host or not number.isdigit() or not 1 <= int(number) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (a port in [1, 65535]), got {text!r}")
    return host.strip("[]"), int(number)


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

    from .remote import model_fingerprint, registration_routes

    dtype, why = resolve_dtype(args.dtype)
    job = dict(model=args.model, tp=args.tp, pp=args.pp, dtype=dtype, max_batch=args.max_batch,
               max_queue=args.max_queue, max_len=args.max_len, kv_blocks=args.kv_blocks,
               kv_memory=None if args.kv_memory is None else args.kv_memory * 2 ** 30, block_size=args.block_size,
               max_step_tokens=args.max_step_tokens, prefix_caching=not args.no_prefix_caching)
    served = ServedModel(served_names(args.model, args.served_model_name), tokenizer, args.max_len or limit,
                         config.vocab_size, args.request_timeout,
                         {"dtype": dtype, "dtype_choice": why, "device": "cuda" if torch.cuda.is_available() else "cpu",
                          "tp": args.tp, "pp": args.pp, "dp": args.dp})
    fingerprint = model_fingerprint(args.model, dtype, served.max_len)
    registration = None
    if args.replica_of is not None:
        try:
            registration = _registration(args, fingerprint)
        except (ValueError, RuntimeError) as err:
            print(f"plait serve: error: {err}", file=sys.stderr)
            return 2
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
    host = args.host or (registration.address if registration else "127.0.0.1")
    refused: list[str] = []
    server: list = []               # the uvicorn server, once made (the refusal callback stops it)

    def on_refused(message: str) -> None:
        refused.append(message)
        server[0].should_exit = True

    try:
        if registration is None:
            app = create_app(router, served)
            app.include_router(registration_routes(router, fingerprint))
            print(f"plait serve: {served.name} on http://{host}:{args.port} (dp={args.dp} pp={args.pp} "
                  f"tp={args.tp}, {served.info['device']}, {dtype}: {why})", flush=True)
        else:
            from .agent import AgentServer, create_agent_app

            app = create_agent_app(router, registration, on_refused)
            print(f"plait serve: {served.name}, {args.dp} replicas (pp={args.pp} tp={args.tp}, {dtype}: {why}) on "
                  f"{registration.url} for the router at {registration.router_url}", flush=True)
        uv_config = uvicorn.Config(app, host=host, port=args.port, log_level="warning",
                                   timeout_graceful_shutdown=int(args.request_timeout) + 5)
        server.append(uvicorn.Server(uv_config) if registration is None else AgentServer(uv_config, registration))
        server[0].run()
    finally:
        router.close()
    if refused:
        print(f"plait serve: error: the router refused this host: {refused[0]}", file=sys.stderr)
        return 2
    return 0


def _registration(args: argparse.Namespace, fingerprint: dict):
    """This replica host's :class:`~plait.serve.agent.Registration`, checked with the router before any model
    loads (a refusal is a ValueError; an unreachable router only a warning: it may start later)."""
    import socket

    import httpx

    from ..nodes import source_address
    from .agent import Refused, Registration

    router_host, router_port = args.replica_of
    advertise = args.advertise or (args.host if args.host not in (None, "0.0.0.0", "::") else None) \
        or source_address(router_host)
    if advertise is None:
        raise ValueError(f"no route to the router's host {router_host!r}; give --advertise ADDR (this host's "
                         f"address as the router reaches it)")
    capacity = args.max_batch + args.max_queue
    registration = Registration(f"http://{router_host}:{router_port}", advertise, args.port, socket.gethostname(),
                                fingerprint, [capacity] * args.dp)
    try:
        registration.post(check_only=True)
    except Refused as err:
        raise ValueError(str(err)) from None
    except httpx.HTTPError as err:
        print(f"plait serve: warning: the router at {registration.router_url} does not answer yet ({err}); "
              f"this host registers once it does", file=sys.stderr)
    return registration
