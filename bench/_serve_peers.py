"""The peers of bench/serve.py that are not plait: transformers ``generate`` in one process, transformers'
own tensor parallelism, and DeepSpeed AutoTP, timed the same way.

Every peer serves its prompts with ``generate`` (greedy, ``min_new_tokens`` = ``max_new_tokens``, so
EOS never ends a request early), ``batch`` prompts per call, the calls one after another:

- time to first token (TTFT) of a call: the wall time of a one-token ``generate`` of its prompts;
- time per output token (TPOT): (wall of the full ``generate`` - TTFT) / (new - 1);
- each request of the call gets its call's TTFT and TPOT; a run's wall is the sum of its full calls.

The tensor-parallel peers run on ``world`` local ranks (one torch thread each, as
:func:`plait.launch.run_ranks` starts them) and report from rank 0:

- ``transformers_tp``: ``from_pretrained(dir, distributed_config=DistributedConfig(tp_size=world))``
  (what ``tp_plan="auto"`` became in transformers 5.x) over a gloo process group;
- ``deepspeed_autotp``: ``deepspeed.init_inference(model, tensor_parallel={"tp_size": world},
  replace_with_kernel_inject=False)``; with ``LOCAL_SIZE`` = world its linear layers reduce through its
  shared-memory all-reduce (see bench/_comm_deepspeed.py), whose /dev/shm buffers are removed after.
"""
from __future__ import annotations

import os
import time

import torch


def timed_generate(model, prompts: list[list[int]], batch: int, new: int, runs: int, warmup: int) -> dict:
    """Serve ``prompts`` with ``model.generate``, ``batch`` per call (see the module docstring).

    Returns ``ttft``, ``tpot`` (seconds, one per request and timed run), ``walls`` (one per timed run) and
    ``tokens`` (each prompt's generated ids, from the last run)."""
    ttft, tpot, walls, tokens = [], [], [], []
    for run in range(warmup + runs):
        wall, tokens = 0.0, []
        for first_row in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[first_row:first_row + batch])
            kwargs = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, **kwargs)
            first = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
            total = time.perf_counter() - start
            wall += total
            tokens += out[:, ids.shape[1]:].tolist()
            if run >= warmup:
                ttft += [first] * ids.shape[0]
                tpot += [(total - first) / (new - 1)] * ids.shape[0]
        if run >= warmup:
            walls.append(wall)
    return dict(ttft=ttft, tpot=tpot, walls=walls, tokens=tokens)


def transformers_run(directory: str, prompts: list[list[int]], new: int, runs: int, warmup: int,
                     threads: int) -> dict:
    """transformers ``generate`` in this process with ``threads`` torch threads, one request after another."""
    import transformers as T

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = T.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        return timed_generate(model, prompts, 1, new, runs, warmup)
    finally:
        torch.set_num_threads(before)


def peer_rank(rank: int, world: int, kind: str, directory: str, prompts: list[list[int]], new: int, runs: int,
              warmup: int):
    """One rank of a tensor-parallel peer (``kind``: "transformers_tp" or "deepspeed_autotp"); all prompts in
    one batch. Rank 0 returns :func:`timed_generate`'s result (plus ``"allreduce"``: how DeepSpeed reduced)."""
    import torch.distributed as dist
    import transformers as T

    dist.init_process_group("gloo")
    extra = {}
    try:
        if kind == "transformers_tp":
            model = T.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **_tp_kwargs(world))
        elif kind == "deepspeed_autotp":
            model, extra["allreduce"] = _deepspeed_model(directory, world)
        else:
            raise ValueError(f"unknown peer {kind!r}")
        result = timed_generate(model.eval(), prompts, len(prompts), new, runs, warmup)
        dist.barrier()
    finally:
        if kind == "deepspeed_autotp" and rank == 0:
            _remove_deepspeed_buffers()
    dist.destroy_process_group()
    return {**result, **extra} if rank == 0 else None


def _tp_kwargs(world: int) -> dict:
    """transformers' tensor-parallel arguments: a DistributedConfig from 5.x on, ``tp_plan="auto"`` before."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    return {"distributed_config": DistributedConfig(tp_size=world)}


def _deepspeed_model(directory: str, world: int):
    """The model under DeepSpeed AutoTP on ``world`` ranks, and which all-reduce it uses for float32."""
    import transformers as T

    from plait.bench._comm_deepspeed import DeepSpeedAllReduce   # sets LOCAL_SIZE, initialises deepspeed.comm

    allreduce = DeepSpeedAllReduce(world)
    import deepspeed

    model = T.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": world}, dtype=torch.float32,
                                      replace_with_kernel_inject=False)
    return engine.module, allreduce.path(torch.float32)


def _remove_deepspeed_buffers() -> None:
    from plait.bench._comm_deepspeed import remove_buffers

    remove_buffers(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
