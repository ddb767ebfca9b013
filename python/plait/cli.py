"""The ``plait`` command line.

    plait info [--json]          versions, devices, plait._C's build, usable comm backends
    plait bench NAME [ARGS...]   run benchmark plait.bench.NAME with ARGS (no NAME: list them)
    plait plan [ARGS...]         search (or estimate) a parallel layout: plait.plan.cli

Subcommands are entries of ``SUBCOMMANDS``: name -> (one-line help, setup function).
A setup function adds its arguments to the parser it is given and sets ``run`` to a
function of the parsed arguments that returns the exit code, so a new subcommand is
one function and one entry.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from collections.abc import Callable, Sequence

# Modules of plait.bench that are tools, not benchmarks.
NOT_BENCHMARKS = frozenset({"common", "report"})


def _setup_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the information as JSON")
    parser.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from plait.info import collect_info, format_info

    info = collect_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def benchmark_names() -> list[str]:
    """Modules of plait.bench that are benchmarks (each has main(argv))."""
    import plait.bench

    return sorted(m.name for m in pkgutil.iter_modules(plait.bench.__path__)
                  if not m.ispkg and not m.name.startswith("_") and m.name not in NOT_BENCHMARKS)


def _setup_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="benchmark to run; leave out to list them")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark's main()")
    parser.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    names = benchmark_names()
    available = "available: " + (", ".join(names) if names else "none (plait.bench has no benchmarks)")
    if args.name is None:
        print(f"usage: plait bench NAME [ARGS...]\n{available}")
        return 0
    if args.name not in names:
        print(f"plait bench: unknown benchmark {args.name!r}; {available}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"plait.bench.{args.name}")
    return int(module.main(args.args) or 0)


def _setup_plan(parser: argparse.ArgumentParser) -> None:
    from plait.plan.cli import setup

    setup(parser)


def _setup_generate(parser: argparse.ArgumentParser) -> None:
    from plait.serve.generate import setup

    setup(parser)


def _setup_serve(parser: argparse.ArgumentParser) -> None:
    from plait.serve.server_cli import setup

    setup(parser)


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "info": ("show versions, devices, the compiled extension and usable backends", _setup_info),
    "bench": ("run a benchmark: plait bench NAME [ARGS...]", _setup_bench),
    "plan": ("choose dp/pp/tp, microbatches and schedule for a model on a cluster", _setup_plan),
    "generate": ("generate text from a transformers model on a TP x PP layout", _setup_generate),
    "serve": ("serve a transformers model over HTTP (OpenAI-compatible) on DP x PP x TP", _setup_serve),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plait", description="plait: data, tensor and pipeline parallelism "
                                                               "for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, setup_command) in SUBCOMMANDS.items():
        setup_command(commands.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `plait` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
