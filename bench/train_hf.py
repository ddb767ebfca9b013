"""`plait train` fine-tuning a transformers Llama, against torch DDP and transformers' tensor parallelism;
activation recomputation against the planner; checkpoint save and load against one step.

    plait bench train_hf [--layers 8 --hidden 1024 --heads 16 --kv-heads 4 --ffn 2816 --vocab 32000]
                         [--seq 256 --global-batch 8 --steps 5 --warmup 1 --lr 1e-4 --clip 1.0]

One run, side by side, on one checkpoint (random weights, float32, written once to a
temporary directory) and one token file in plait's format (:mod:`plait.train.data`: flat
uint16 ids, sequence i = tokens[i*seq : i*seq+seq+1], step s takes sequences
[s*B, (s+1)*B), DP rank d its contiguous share). Every rank runs one thread.

Throughput (tokens/s of the global batch, median over the steps after ``--warmup``; a step
lasts as long as its slowest rank) and peak resident memory per rank (``ru_maxrss``,
loading included):

- ``plait dp=2``: ``plait train``'s job code itself (:func:`plait.train.train_rank`: AdamW
  with betas (0.9, 0.95), eps 1e-8, no weight decay, constant lr, clipping to ``--clip``);
- ``torch DDP dp=2``: a plain loop, transformers model in ``DistributedDataParallel`` (gloo),
  ``torch.optim.AdamW`` with the same settings, ``clip_grad_norm_``, the same sequences;
- ``plait tp=2``: the same job as plait dp=2 on the other layout;
- ``transformers tp=2``: ``from_pretrained(dir, tp_plan="auto")`` (DTensor over gloo) in the
  same plain loop on the whole global batch. ``clip_grad_norm_`` refuses its mix of DTensor
  (sharded) and plain (norm) gradients, so the loop adds the two groups' norms itself.

The losses of every contender are compared with DDP's (same data, same initial weights);
float32 with other reduction orders agrees to about 1e-6.

Recomputation (``--recompute none | selective | full`` of the plait dp=2 job): the peak
ACTIVATION memory of a step, measured as the peak resident set during the step's forward
and backward (``engine.train_step``) minus the resident set just before it, on steps after
the first, when the weights, the gradient buffers and AdamW's state already exist; so only
what forward and backward add is counted (kept activations, recomputed ones, logits and the
loss's buffers). The ranks set glibc's mmap threshold to 64 KiB (``mallopt``): every large
tensor then gets its own pages and returns them when freed, so the resident set follows live
memory instead of glibc's cache. The measured saving is set beside the planner's prediction
(:mod:`plait.plan.memory`, through :func:`plait.plan.estimate` for the same model and layout;
the planner counts 2-byte activations, so its bytes are doubled for float32). Losses of the
three modes must be equal.

Checkpoint: after the plait dp=2 job saved its final checkpoint, every rank loads it as a
resumed job does (checks, ``plait.from_pretrained``, AdamW state) and saves it again
(:func:`plait.train.checkpoint.save_checkpoint`: model, AdamW state, fsync, rename), each
timed between barriers and set beside the median step of the plait dp=2 job. The load reads
files the save just wrote, mostly from the page cache.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from plait.bench.common import (PeakResident, command_line, positive_float, print_table, repeats, save_plot, size,
                                write_result)
from plait.bench.hf import LlamaDims, save_random_llama
from plait.launch import run_ranks

RANK_TIMEOUT_S = 3600
TARGETS = {"dp_tokens_per_s_vs_ddp": 1.0, "tp_step_vs_transformers_tp": 0.85, "full_recompute_activations": 0.5,
           "checkpoint_vs_step": 1.0}
RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class Run:
    """What every contender trains: the batch, the steps and the optimizer's settings."""

    seq: int = 256
    global_batch: int = 8
    steps: int = 5
    warmup: int = 1
    lr: float = 1e-4
    clip: float = 1.0

    @property
    def tokens_per_step(self) -> int:
        return self.seq * self.global_batch


@dataclass(frozen=True)
class Files:
    model: str
    data: str
    save: str


def write_files(root: Path, dims: LlamaDims, run: Run) -> Files:
    """The checkpoint and a token file of random ids holding every step's sequences once."""
    save_random_llama(root / "model", dims)
    tokens = np.random.default_rng(0).integers(0, dims.vocab, run.steps * run.global_batch * run.seq + 1)
    tokens.astype(np.uint16).tofile(root / "data.bin")
    return Files(model=str(root / "model"), data=str(root / "data.bin"), save=str(root / "checkpoints"))


def job_spec(files: Files, run: Run, **settings) -> dict:
    """A ``plait train`` job (TrainJob settings) of the benchmark run."""
    return dict(model=files.model, data=files.data, seq=run.seq, global_batch=run.global_batch, steps=run.steps,
                lr=run.lr, weight_decay=0.0, lr_schedule="constant", warmup=0, clip_grad=run.clip, dtype="float32",
                **settings)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- plait
def plait_rank(rank: int, world: int, spec: dict, time_checkpoint: bool) -> dict:
    """The plait train job on this rank; then, with ``time_checkpoint``, its checkpoint loaded and saved."""
    import torch.distributed as dist

    from plait.train import TrainJob, train_rank

    dist.init_process_group("gloo")
    job = TrainJob.from_dict(spec)
    summary = train_rank(job, show=False)
    out = dict(losses=[r.loss for r in summary.records], seconds=[r.seconds for r in summary.records],
               peak_bytes=_peak_rss())
    if time_checkpoint:
        out["checkpoint"] = _checkpoint_times(job, Path(summary.checkpoint))
    dist.destroy_process_group()
    return out


def _checkpoint_times(job, checkpoint: Path) -> dict:
    """Seconds to load ``checkpoint`` as a resumed job does, and to save it again (between barriers)."""
    import torch.distributed as dist

    import plait
    from plait.train.checkpoint import check_checkpoint, load_optimizer_state, save_checkpoint
    from plait.train.loop import _fingerprint, model_config, parameter_shapes
    from plait.train.optim import Optimizer

    config = model_config(job)
    mesh = plait.init_mesh(job.parallel)
    dist.barrier()
    start = time.perf_counter()
    shapes, tied = parameter_shapes(config)
    state = check_checkpoint(checkpoint, shapes, _fingerprint(job), tied)
    model = plait.from_pretrained(checkpoint, mesh, torch.float32, config=job.parallel)
    optimizer = Optimizer(model, job, start_step=state["step"])
    load_optimizer_state(checkpoint, state, model, optimizer)
    dist.barrier()
    load_s = time.perf_counter() - start
    again = checkpoint.parent.parent / "saved-again"
    start = time.perf_counter()
    path = save_checkpoint(again, state["step"], model, optimizer, {"fingerprint": _fingerprint(job), "lr": job.lr},
                           keep=1)
    dist.barrier()
    save_s = time.perf_counter() - start
    written = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return dict(load_s=load_s, save_s=save_s, bytes=written)


def recompute_rank(rank: int, world: int, specs: list[dict], warmup: int) -> list[dict]:
    """Each job (one per recompute mode) in turn; per job its losses, step times and activation peak."""
    import torch.distributed as dist

    from plait.train import TrainJob, train_rank

    _return_freed_memory()
    dist.init_process_group("gloo")
    out = []
    for spec in specs:
        probes: list[PeakResident] = []

        def probe() -> PeakResident:
            probes.append(PeakResident())
            return probes[-1]

        summary = train_rank(TrainJob.from_dict(spec), show=False, around_step=probe)
        out.append(dict(losses=[r.loss for r in summary.records], seconds=[r.seconds for r in summary.records],
                        activation_bytes=max(p.increase for p in probes[max(1, warmup):])))
    dist.destroy_process_group()
    return out


def _return_freed_memory() -> None:
    """glibc: blocks of 64 KiB and more are mmapped and unmapped when freed (module doc)."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 16) and libc.mallopt(m_trim_threshold, 1 << 16)):
        raise RuntimeError("mallopt refused the mmap threshold: activation memory cannot be measured")


# --------------------------------------------------------------------------- plain loops
def _rows(tokens: np.ndarray, run: Run, step: int, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of rows [first, first + count) of step ``step``'s global batch (module doc)."""
    sequences = (len(tokens) - 1) // run.seq
    index = [(step * run.global_batch + first + i) % sequences for i in range(count)]
    batch = torch.from_numpy(np.stack([tokens[i * run.seq:i * run.seq + run.seq + 1] for i in index]).astype(np.int64))
    return batch[:, :-1], batch[:, 1:]


def _plain_loop(model, optimizer, clip, run: Run, data: str, first: int, count: int, loss_group_size: int) -> dict:
    """Forward, backward, clip, AdamW step per step; the loss averaged over ``loss_group_size`` ranks."""
    import torch.distributed as dist

    tokens = np.fromfile(data, dtype=np.uint16)
    losses, seconds = [], []
    for step in range(run.steps):
        start = time.perf_counter()
        ids, targets = _rows(tokens, run, step, first, count)
        logits = model(ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        clip()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach().double()
        if loss_group_size > 1:
            dist.all_reduce(loss)
            loss /= loss_group_size
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
    return dict(losses=losses, seconds=seconds, peak_bytes=_peak_rss())


def _adamw(params, run: Run) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=run.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)


def ddp_rank(rank: int, world: int, files: Files, run: Run) -> dict:
    """transformers' model under torch DistributedDataParallel; this rank's share of each global batch."""
    import torch.distributed as dist
    import transformers
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    model = transformers.AutoModelForCausalLM.from_pretrained(files.model, dtype=torch.float32)
    ddp = DistributedDataParallel(model)
    optimizer = _adamw(model.parameters(), run)
    rows = run.global_batch // world
    out = _plain_loop(ddp, optimizer, lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), run.clip), run,
                      files.data, rank * rows, rows, world)
    dist.destroy_process_group()
    return out


def transformers_tp_rank(rank: int, world: int, files: Files, run: Run) -> dict:
    """transformers' own tensor parallelism (``tp_plan="auto"``, DTensor over gloo); the whole global batch."""
    import torch.distributed as dist
    import transformers

    dist.init_process_group("gloo")
    model = transformers.AutoModelForCausalLM.from_pretrained(files.model, dtype=torch.float32, tp_plan="auto")
    optimizer = _adamw(model.parameters(), run)
    out = _plain_loop(model, optimizer, lambda: _clip_mixed(model.parameters(), run.clip), run, files.data,
                      0, run.global_batch, 1)
    dist.destroy_process_group()
    return out


@torch.no_grad()
def _clip_mixed(params, max_norm: float) -> float:
    """``clip_grad_norm_`` over DTensor and plain gradients together (it refuses the mix): the global norm
    is the root of the two groups' squared norms (a DTensor norm is already over its mesh)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    squares = 0.0
    if sharded:
        squares += float(torch.nn.utils.get_total_norm(sharded).full_tensor()) ** 2
    if plain:
        squares += float(torch.nn.utils.get_total_norm(plain)) ** 2
    norm = squares ** 0.5
    scale = min(1.0, max_norm / (norm + 1e-6))
    for grad in grads:
        grad.mul_(scale)
    return norm


# --------------------------------------------------------------------------- the planner
def planner_activations(dims: LlamaDims, run: Run, dp: int, mode: str) -> float:
    """Bytes of activations per rank the planner predicts for the plait dp job in recompute ``mode``,
    doubled for float32 (it counts 2-byte values). Flash attention: torch's CPU SDPA keeps no scores."""
    from plait.plan import JobSpec, Layout, ModelSpec, estimate, hardware

    model = ModelSpec(name="bench", num_layers=dims.layers, hidden=dims.hidden, num_heads=dims.heads,
                      ffn_hidden=dims.ffn, vocab_size=dims.vocab, seq_len=run.seq, num_kv_heads=dims.kv_heads,
                      mlp="swiglu", dropout=False, tied_embeddings=False)
    job = JobSpec(global_batch=run.global_batch, zero_stage=0, recompute=mode, sequence_parallel=False,
                  flash_attention=True)
    layout = Layout(dp=dp, microbatch_size=run.global_batch // dp, recompute=mode, sequence_parallel=False)
    est = estimate(model=model, cluster=hardware("h100", dp), job=job, layout=layout)
    return 2 * est.memory.activations * 1e9


# --------------------------------------------------------------------------- report
def _step_seconds(per_rank: list[dict], warmup: int) -> list[float]:
    """Per step after the warm-up, the slowest rank's time."""
    return [max(times) for times in zip(*(r["seconds"] for r in per_rank))][warmup:]


def _loss_difference(losses: list[float], reference: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference))


def summarize(per_contender: dict[str, list[dict]], recompute: list[list[dict]], dims: LlamaDims, run: Run,
              dp: int) -> dict:
    """Medians, ratios to the targets, recomputation against the planner, checkpoint against a step."""
    reference = per_contender["torch DDP dp=2"][0]["losses"]
    contenders = {}
    for name, per_rank in per_contender.items():
        steps = _step_seconds(per_rank, run.warmup)
        contenders[name] = dict(ranks=len(per_rank), step_s=statistics.median(steps), step_s_all=steps,
                                tokens_per_s=run.tokens_per_step / statistics.median(steps),
                                peak_mib=[r["peak_bytes"] / 2**20 for r in per_rank], losses=per_rank[0]["losses"],
                                loss_rel_diff_vs_ddp=_loss_difference(per_rank[0]["losses"], reference))
    modes = {}
    for i, mode in enumerate(RECOMPUTE_MODES):
        per_rank = [rank_jobs[i] for rank_jobs in recompute]
        modes[mode] = dict(activation_mib=max(r["activation_bytes"] for r in per_rank) / 2**20,
                           activation_mib_per_rank=[r["activation_bytes"] / 2**20 for r in per_rank],
                           planner_mib=planner_activations(dims, run, dp, mode) / 2**20,
                           step_s=statistics.median(_step_seconds(per_rank, run.warmup)),
                           losses=per_rank[0]["losses"])
    for mode, entry in modes.items():
        entry["vs_none"] = entry["activation_mib"] / modes["none"]["activation_mib"]
        entry["planner_vs_none"] = entry["planner_mib"] / modes["none"]["planner_mib"]
        entry["loss_rel_diff_vs_none"] = _loss_difference(entry["losses"], modes["none"]["losses"])
    plait_dp = per_contender[f"plait dp={dp}"]
    times = [r["checkpoint"] for r in plait_dp]
    checkpoint = dict(save_s=max(t["save_s"] for t in times), load_s=max(t["load_s"] for t in times),
                      bytes=times[0]["bytes"], step_s=contenders[f"plait dp={dp}"]["step_s"])
    checkpoint["vs_step"] = (checkpoint["save_s"] + checkpoint["load_s"]) / checkpoint["step_s"]
    hf_tp = next((c for n, c in contenders.items() if n.startswith("transformers tp")), None)
    plait_tp = next((c for n, c in contenders.items() if n.startswith("plait tp")), None)
    ratios = {"dp_tokens_per_s_vs_ddp": contenders[f"plait dp={dp}"]["tokens_per_s"]
              / contenders["torch DDP dp=2"]["tokens_per_s"],
              "tp_step_vs_transformers_tp": plait_tp["step_s"] / hf_tp["step_s"] if hf_tp and plait_tp else None,
              "full_recompute_activations": modes["full"]["vs_none"],
              "checkpoint_vs_step": checkpoint["vs_step"]}
    met = {"dp_tokens_per_s_vs_ddp": ratios["dp_tokens_per_s_vs_ddp"] >= TARGETS["dp_tokens_per_s_vs_ddp"]}
    met.update({k: ratios[k] is not None and ratios[k] <= TARGETS[k] for k in TARGETS if k not in met})
    return dict(contenders=contenders, recompute=modes, checkpoint=checkpoint, ratios=ratios, targets=TARGETS,
                met=met)


def tables(result: dict) -> list[dict]:
    """The result as the tables of docs/benchmarks.md."""
    contenders = [[name, f"{c['ranks']} x 1", round(c["tokens_per_s"]), round(c["step_s"], 3),
                   " / ".join(f"{m:.0f}" for m in c["peak_mib"]), f"{c['loss_rel_diff_vs_ddp']:.1e}"]
                  for name, c in result["contenders"].items()]
    recompute = [[mode, round(m["activation_mib"], 1), round(m["planner_mib"], 1), round(m["vs_none"], 3),
                  round(m["planner_vs_none"], 3), round(m["step_s"], 3), f"{m['loss_rel_diff_vs_none']:.1e}"]
                 for mode, m in result["recompute"].items()]
    c = result["checkpoint"]
    checkpoint = [[round(c["save_s"], 2), round(c["load_s"], 2), round(c["step_s"], 3), round(c["bytes"] / 2**20),
                   round(c["vs_step"], 2)]]
    names = {"dp_tokens_per_s_vs_ddp": ("plait dp=2 / DDP tokens/s", ">="),
             "tp_step_vs_transformers_tp": ("plait tp=2 / transformers tp=2 step time", "<="),
             "full_recompute_activations": ("recompute full / none peak activations", "<="),
             "checkpoint_vs_step": ("checkpoint save + load / one step", "<")}
    targets = [[names[k][0], "-" if v is None else round(v, 3), f"{names[k][1]} {result['targets'][k]}",
                "yes" if result["met"][k] else "no"] for k, v in result["ratios"].items()]
    return [
        {"title": "Throughput (median step after warm-up; ranks of 1 thread)",
         "columns": ["contender", "ranks x threads", "tokens/s", "step s", "peak MiB per rank (RSS)",
                     "loss rel. diff vs DDP"], "rows": contenders},
        {"title": "Targets", "columns": ["ratio", "measured", "target", "met"], "rows": targets},
        {"title": "Recomputation (plait dp=2): peak activation MiB per rank, measured vs the planner (x2 for fp32)",
         "columns": ["recompute", "measured MiB", "planner MiB", "measured / none", "planner / none", "step s",
                     "loss rel. diff vs none"], "rows": recompute},
        {"title": "Checkpoint of the whole job (plait dp=2)",
         "columns": ["save s", "load s", "one step s", "MiB written", "(save + load) / step"], "rows": checkpoint},
    ]


def plot(result: dict, path: Path) -> bool:
    """Tokens/s per contender, activation memory per recompute mode (measured, planner), checkpoint vs step."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    names = list(result["contenders"])
    axes[0].bar(names, [result["contenders"][n]["tokens_per_s"] for n in names],
                color=["tab:blue", "grey", "tab:orange", "silver"][:len(names)])
    axes[0].set_ylabel("tokens/s (median step)")
    axes[0].tick_params(axis="x", labelrotation=20, labelsize=7)
    modes = list(result["recompute"])
    x = np.arange(len(modes))
    axes[1].bar(x - 0.2, [result["recompute"][m]["activation_mib"] for m in modes], 0.4, label="measured")
    axes[1].bar(x + 0.2, [result["recompute"][m]["planner_mib"] for m in modes], 0.4, label="planner (x2, fp32)")
    axes[1].set_xticks(x, modes)
    axes[1].set_ylabel("peak activation MiB per rank")
    axes[1].legend()
    c = result["checkpoint"]
    axes[2].bar(["save", "load", "one step"], [c["save_s"], c["load_s"], c["step_s"]],
                color=["tab:blue", "tab:cyan", "grey"])
    axes[2].set_ylabel("seconds")
    fig.suptitle("plait train on a transformers Llama (CPU, float32)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main
def run_all(files: Files, dims: LlamaDims, run: Run, dp: int = 2, tp: int = 2) -> dict:
    """Every contender, then the recomputation jobs; see the module doc."""
    def start(name: str, fn, world: int, *args):
        print(f"{name} on {world} ranks ...", flush=True)
        return run_ranks(fn, world, *args, timeout=RANK_TIMEOUT_S)

    contenders = {
        f"plait dp={dp}": start(f"plait dp={dp} (then its checkpoint)", plait_rank, dp,
                                job_spec(files, run, dp=dp, save=files.save), True),
        f"torch DDP dp={dp}": start(f"torch DDP dp={dp}", ddp_rank, dp, files, run),
        f"plait tp={tp}": start(f"plait tp={tp}", plait_rank, tp, job_spec(files, run, tp=tp), False),
    }
    try:
        contenders[f"transformers tp={tp}"] = start(f"transformers tp={tp}", transformers_tp_rank, tp, files, run)
    except Exception as err:  # noqa: BLE001 - recorded in the result, the rest still runs
        print(f"transformers tp={tp} failed: {err}", flush=True)
        transformers_tp_error = str(err)[-2000:]
    else:
        transformers_tp_error = None
    specs = [job_spec(files, run, dp=dp, recompute=mode) for mode in RECOMPUTE_MODES]
    recompute = start(f"plait dp={dp} with recompute {', '.join(RECOMPUTE_MODES)}", recompute_rank, dp, specs,
                      run.warmup)
    result = summarize(contenders, recompute, dims, run, dp)
    result["transformers_tp_error"] = transformers_tp_error
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="plait bench train_hf", description=__doc__.split("\n\n")[0])
    for field, value in asdict(LlamaDims()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=size(), default=value)
    parser.add_argument("--seq", type=size(), default=Run.seq)
    parser.add_argument("--global-batch", type=size(), default=Run.global_batch,
                        help="sequences per step (a multiple of 2: dp=2 splits it)")
    parser.add_argument("--steps", type=repeats(), default=Run.steps)
    parser.add_argument("--warmup", type=repeats(0), default=Run.warmup, help="first steps left out of the medians")
    parser.add_argument("--lr", type=positive_float(1.0), default=Run.lr)
    parser.add_argument("--clip", type=positive_float(1e6), default=Run.clip, help="gradient clipping norm")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    if args.global_batch % 2:
        parser.error(f"--global-batch must be even (dp=2 splits it), got {args.global_batch}")
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    if args.vocab > 1 << 16:
        parser.error(f"--vocab must fit uint16 token files (<= 65536), got {args.vocab}")
    dims = LlamaDims(**{f: getattr(args, f) for f in asdict(LlamaDims())})
    run = Run(seq=args.seq, global_batch=args.global_batch, steps=args.steps, warmup=args.warmup, lr=args.lr,
              clip=args.clip)
    with tempfile.TemporaryDirectory(prefix="plait-bench-train-hf-") as root:
        files = write_files(Path(root), dims, run)
        load_before = os.getloadavg()
        result = run_all(files, dims, run)
    result.update(dims=asdict(dims), run=asdict(run), load_average_before=list(load_before),
                  load_average_after=list(os.getloadavg()))
    result["tables"] = tables(result)
    for table in result["tables"]:
        print(f"\n{table['title']}")
        print_table(table["columns"], table["rows"])
    if result["transformers_tp_error"]:
        print(f"\ntransformers tp=2 could not train: {result['transformers_tp_error']}")
    if not args.no_save:
        path = write_result("train_hf", result, command_line("train_hf", argv))
        save_plot(plot, result, path.with_suffix(".png"))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
