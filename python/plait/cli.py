"""The ``plait`` command line.

    plait info [--json]          versions, devices, plait._C's build, usable comm backends
    plait bench NAME [ARGS...]   run benchmark plait.bench.NAME with ARGS (no NAME: list them)
    plait plan [ARGS...]         search (or estimate) a parallel layout: plait.plan.cli
    plait train [JOB] [ARGS...]  a training job: plait.train.cli
    plait data prepare ...       tokenize text into a token file: plait.train.cli

Subcommands are entries of ``SUBCOMMANDS``: name -> (one-line help, setup function).
A setup function adds its arguments to the parser it is given and sets ``run`` to a
function of the parsed arguments that returns the exit code, so a new subcommand is
one function and one entry.

Errors: :func:`main` runs every subcommand under one handler. A subcommand reports bad
input by raising (ValueError, OSError, a :class:`~plait.errors.PlaitError`, ...); the
handler prints it as one line, ``plait COMMAND: error: MESSAGE``, on stderr and returns
exit status 2 (argparse's usage errors are 2 as well). The traceback is printed only
with ``plait --debug ...`` (or ``plait COMMAND --debug`` where the command takes no free
arguments) or ``PLAIT_DEBUG=1``. An exception that is not one of those kinds is a bug in
plait: it is still one line, marked "internal error", with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from .errors import PlaitError
from .launch import RanksFailed

# Modules of plait.bench that are tools, not benchmarks.
NOT_BENCHMARKS = frozenset({"common", "report"})
# What bad input raises: reported as "error", not as "internal error" (RanksFailed: ranks of a
# job that raised; the line names each rank's own error).
USER_ERRORS = (PlaitError, ValueError, OSError, ImportError, RanksFailed)


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


def _setup_train(parser: argparse.ArgumentParser) -> None:
    from plait.train.cli import setup_train

    setup_train(parser)


def _setup_data(parser: argparse.ArgumentParser) -> None:
    from plait.train.cli import setup_data

    setup_data(parser)


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
    "train": ("train a model: plait train job.yaml | --model DIR --data FILE ...", _setup_train),
    "data": ("prepare training data: plait data prepare --tokenizer DIR --input FILES --output FILE", _setup_data),
    "generate": ("generate text from a transformers model on a TP x PP layout", _setup_generate),
    "serve": ("serve a transformers model over HTTP (OpenAI-compatible) on DP x PP x TP", _setup_serve),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plait", description="plait: data, tensor and pipeline parallelism "
                                                               "for PyTorch.")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error (also PLAIT_DEBUG=1)")
    # The same flag after the command; SUPPRESS keeps a --debug given before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, setup_command) in SUBCOMMANDS.items():
        setup_command(commands.add_parser(name, help=help_text, description=help_text, parents=[common]))
    return parser


def debug_enabled(args: argparse.Namespace | None = None) -> bool:
    """Whether errors should show their traceback: ``--debug`` or ``PLAIT_DEBUG=1``."""
    env = os.environ.get("PLAIT_DEBUG", "").strip().lower()
    return bool(getattr(args, "debug", False)) or env in ("1", "true", "yes", "on")


def error_line(exc: BaseException) -> str:
    """One line describing `exc`: its message's first line (a rank failure: each rank's own error)."""
    text = str(exc).strip()
    if isinstance(exc, RanksFailed):
        head, *parts = text.split("\n--- rank ")
        ranks = []
        for part in parts:
            rank, _, body = part.partition(" ---\n")
            last = [line for line in body.splitlines() if line.strip()][-1:] or ["(no traceback)"]
            ranks.append(f"rank {rank}: {last[0].strip()}")
        return "; ".join([head.splitlines()[0], *ranks])
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    more = f" (and {len(lines) - 1} more lines: rerun with --debug)" if len(lines) > 1 else ""
    return lines[0].strip() + more


def report_error(command: str, exc: BaseException, debug: bool) -> int:
    """Print `exc` for the user (one line; the traceback first when `debug`) and return exit status 2."""
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, USER_ERRORS):
        print(f"plait {command}: error: {error_line(exc)}", file=sys.stderr)
    else:
        hint = "" if debug else "; rerun with --debug for the traceback"
        print(f"plait {command}: internal error ({type(exc).__name__}): {error_line(exc)}{hint}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `plait` console script; returns the exit code.

    Every subcommand runs under the error handler described in the module docstring;
    argparse's own exits (usage errors, ``--help``) become return values too.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return _exit_code(exc, "")
    try:
        return args.run(args)
    except SystemExit as exc:     # a benchmark's own argparse parser, or sys.exit("message")
        return _exit_code(exc, args.command)
    except KeyboardInterrupt:
        print(f"plait {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into exit codes
        return report_error(args.command, exc, debug_enabled(args))


def _exit_code(exc: SystemExit, command: str) -> int:
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(f"plait {command}: error: {exc.code}", file=sys.stderr)   # sys.exit("message")
    return 2

if __name__ == "__main__":
    sys.exit(main())
