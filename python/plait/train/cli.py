"""``plait train`` and ``plait data prepare``: setup functions for plait's command line.

    plait train job.yaml [--steps 200 ...]        a job file, flags override its settings
    plait train --model DIR --data data.bin --dp 2 --pp 2 --tp 2 --save ckpt --resume latest
    plait data prepare --tokenizer DIR --input a.txt b.jsonl --output data.bin

``plait train`` starts ``dp * pp * tp`` local processes (:func:`plait.launch.run_ranks`)
unless it runs under torchrun (RANK and WORLD_SIZE set), where each process is one rank;
a one-rank job runs in this process. Over several hosts, each host runs the same command
with ``--nnodes N --node-rank I --master-addr HOST0 [--master-port P]`` and starts its
``dp * pp * tp / N`` ranks (:mod:`plait.nodes`). Flags are generated from :class:`~plait.train.job.TrainJob`,
so a flag and a job-file key are always the same setting. Errors (bad settings or files, a
rank that fails or dies, named) reach plait's command-line handler: one line, exit code 2.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, fields

from ..nodes import add_node_options, node_from_args
from .job import TrainJob, read_job_file

_TYPES = {"int": int, "float": float, "str": str, "Optional[str]": str}


def setup_train(parser: argparse.ArgumentParser) -> None:
    """Add ``plait train``'s arguments (one flag per TrainJob field) and its run function."""
    parser.add_argument("job_file", nargs="?", help="YAML or JSON job file (flags override its settings)")
    for f in fields(TrainJob):
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", "")
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            default = "" if f.default is MISSING or f.default is None else f" (default {f.default})"
            parser.add_argument(flag, dest=f.name, type=_TYPES[f.type], default=None, metavar=f.name.upper(),
                                help=text + default)
    add_node_options(parser)
    parser.set_defaults(run=run_train)


def job_from_args(args: argparse.Namespace) -> TrainJob:
    """The job of a job file and/or flags; ValueError (naming the file or the setting) if it is not valid."""
    settings = read_job_file(args.job_file) if args.job_file else {}
    for f in fields(TrainJob):
        value = getattr(args, f.name, None)
        if value is not None:
            settings[f.name] = value
    return TrainJob.from_dict(settings, where=args.job_file or "plait train")


def _rank_main(rank: int, world: int, job: TrainJob) -> None:
    from .loop import train_rank

    train_rank(job)


def run_train(args: argparse.Namespace) -> int:
    """Run the job; errors (bad settings, a failed or dead rank) go to plait's command-line handler."""
    from ..launch import run_ranks

    job = job_from_args(args)
    node = node_from_args(args)
    local = node.local_ranks(job.world_size)
    if node.multi_host:       # the hosts' ranks are known before any starts: check the layout's rule now
        job.parallel.check_hosts([f"node {r // len(local)}" for r in range(job.world_size)])
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ or job.world_size == 1:
        from .loop import train_rank

        train_rank(job)
    else:
        threads = max(1, (os.cpu_count() or 1) // len(local))
        run_ranks(_rank_main, job.world_size, job, timeout=float("inf"), threads_per_rank=threads, node=node)
    return 0


def setup_data(parser: argparse.ArgumentParser) -> None:
    """``plait data prepare``: tokenize text files into a token file."""
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prepare = commands.add_parser("prepare", help="tokenize text into a token file for plait train")
    prepare.add_argument("--tokenizer", required=True, help="directory with a transformers tokenizer")
    prepare.add_argument("--input", required=True, nargs="+", help="text files (.txt: one document each; "
                                                                   ".jsonl: one document per line's 'text')")
    prepare.add_argument("--output", required=True, help="token file to write (.bin/.u16: uint16, .u32: uint32)")
    prepare.add_argument("--data-dtype", choices=("uint16", "uint32"), default=None,
                         help="token dtype (default: from the output suffix)")
    prepare.set_defaults(run=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare

    count = prepare(args.tokenizer, args.input, args.output, args.data_dtype)
    print(f"wrote {count} tokens to {args.output}")
    return 0
