"""A transformers Llama on CPU: plait tp=2 (shm) against transformers' tensor parallelism and one process.

    plait bench hf [--layers 8 --hidden 1024 --heads 16 --kv-heads 4 --ffn 2816 --vocab 32000]
                   [--batch 1 --seq 128] [--reps 7] [--warmup 2]

One run, side by side on the same checkpoint (random weights, float32, written once to a
temporary directory):

- ``1 process``: transformers' model in one process using every core;
- ``plait tp=2 (shm)``: ``plait.from_pretrained`` on a mesh whose communicators are plait's
  shared-memory backend (``init_mesh(tp=2, comm="shm")``), one thread per rank;
- ``transformers tp=2``: ``AutoModelForCausalLM.from_pretrained(dir, tp_plan="auto")`` under a
  torchrun environment with gloo, one thread per rank;
- ``1 process, 1 thread``: for context (what one core does; not a target).

Each contender times a forward+backward step (loss: mean next-token cross-entropy) and a
forward (prefill) of ``--batch x --seq`` tokens, ``--warmup`` untimed then ``--reps`` timed;
a multi-rank step counts as long as its slowest rank, and the medians are reported with
their ratios to the issue's targets (plait <= 0.85x transformers tp=2, <= 1.1x one process).
Logits of every contender are checked against the one-process model.

Memory: the peak resident increase per rank of ``plait.from_pretrained`` at tp=2 against
transformers' ``from_pretrained`` of the whole model in one process (target: <= 0.6x),
each measured in a fresh process (:class:`~plait.bench.common.PeakResident`) over the load
followed by one read of every parameter: transformers keeps the weights as pages of the
memory-mapped checkpoint that become resident only when used, so without that read its
"load" would look nearly free. The peak during the load call alone is recorded too.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from plait.bench.common import PeakResident, command_line, print_table, wall_times_ms, write_result
from plait.launch import run_ranks


@dataclass(frozen=True)
class LlamaDims:
    """Dimensions of the benchmark's Llama (GQA, untied embeddings)."""

    layers: int = 8
    hidden: int = 1024
    heads: int = 16
    kv_heads: int = 4
    ffn: int = 2816
    vocab: int = 32000

    def config(self):
        import transformers

        return transformers.LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.ffn,
                                        num_hidden_layers=self.layers, num_attention_heads=self.heads,
                                        num_key_value_heads=self.kv_heads, max_position_embeddings=2048,
                                        tie_word_embeddings=False, dtype="float32")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter shapes of one decoder layer, by name inside the layer."""
        h, kv, f = self.hidden, self.kv_heads * self.head_dim, self.ffn
        return {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
                "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
                "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
                "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every stored tensor's shape, by its checkpoint name."""
        out = {"model.embed_tokens.weight": (self.vocab, self.hidden)}
        for i in range(self.layers):
            out.update({f"model.layers.{i}.{k}": v for k, v in self.layer_shapes().items()})
        out.update({"model.norm.weight": (self.hidden,), "lm_head.weight": (self.vocab, self.hidden)})
        return out


def save_random_llama(directory, dims: LlamaDims, seed: int = 0) -> None:
    """Write a transformers checkpoint (config.json + model.safetensors, float32) of random weights.

    Tensors are made one at a time (never the whole model as a transformers module), so
    writing a few hundred MB takes seconds.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dims.config().save_pretrained(str(directory))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in dims.shapes().items():
        if len(shape) == 1:
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            tensors[name] = torch.empty(shape).normal_(0.0, 0.02, generator=gen)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


# --------------------------------------------------------------------------- timing


def _inputs(dims: LlamaDims, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (torch.randint(0, dims.vocab, (batch, seq), generator=gen),
            torch.randint(0, dims.vocab, (batch, seq), generator=gen))


def _hf_timings(model, ids, targets, warmup: int, reps: int, barrier=None) -> dict:
    """Forward+backward (cross-entropy of every position) and forward times of a transformers model."""
    def step():
        logits = model(ids, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
        model.zero_grad(set_to_none=True)

    def prefill():
        with torch.no_grad():
            model(ids, use_cache=False)

    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    return dict(step_ms=wall_times_ms(step, warmup, reps, barrier), prefill_ms=wall_times_ms(prefill, warmup, reps, barrier),
                logits=logits.float())


@torch.no_grad()
def _touch(model: torch.nn.Module) -> None:
    """Read every parameter once. transformers maps the checkpoint and its weights stay file pages
    that become resident only when used; reading them counts the memory the model needs to run."""
    for param in model.parameters():
        param.sum()


def _warm_imports() -> None:
    """Import what loading needs before measuring it: module imports are not the loader's memory."""
    import safetensors.torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401


def one_process(rank: int, world: int, directory: str, dims: LlamaDims, batch: int, seq: int, warmup: int,
                reps: int) -> dict:
    """transformers in this one process (every core): load memory and timings."""
    import transformers

    _warm_imports()
    with PeakResident() as peak:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        during_load = peak.increase_so_far()
        _touch(model)
    ids, targets = _inputs(dims, batch, seq)
    return dict(load_peak=peak.increase, during_load=during_load, threads=torch.get_num_threads(),
                **_hf_timings(model, ids, targets, warmup, reps))


def transformers_tp(rank: int, world: int, directory: str, dims: LlamaDims, batch: int, seq: int, warmup: int,
                    reps: int) -> dict:
    """transformers' own tensor parallelism (DTensor over gloo), one thread per rank."""
    import torch.distributed as dist
    import transformers

    _warm_imports()
    dist.init_process_group("gloo")
    with PeakResident() as peak:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, distributed_config=transformers.DistributedConfig(tp_size=world))
        during_load = peak.increase_so_far()
        _touch(model)
    ids, targets = _inputs(dims, batch, seq)
    out = dict(load_peak=peak.increase, during_load=during_load, **_hf_timings(model, ids, targets, warmup, reps, barrier=dist.barrier))
    out["logits"] = out["logits"] if rank == 0 else None
    dist.barrier()
    dist.destroy_process_group()
    return out


def plait_tp(rank: int, world: int, directory: str, dims: LlamaDims, batch: int, seq: int, warmup: int,
             reps: int) -> dict:
    """plait.from_pretrained at tp=world over the shm communicator, one thread per rank."""
    import plait

    _warm_imports()
    mesh = plait.init_mesh(tp=world, comm="shm")
    with PeakResident() as peak:
        model = plait.from_pretrained(directory, mesh, dtype=torch.float32)
        during_load = peak.increase_so_far()
        _touch(model)
    ids, targets = _inputs(dims, batch, seq)

    def step():
        model.loss_fn(model.forward_local(ids), targets).backward()
        model.zero_grad(set_to_none=True)

    def prefill():
        with torch.no_grad():
            model.forward_local(ids)

    logits = model.logits(ids)
    barrier = mesh.tp_comm.barrier
    out = dict(load_peak=peak.increase, during_load=during_load, step_ms=wall_times_ms(step, warmup, reps, barrier),
               prefill_ms=wall_times_ms(prefill, warmup, reps, barrier), logits=logits if rank == 0 else None)
    plait.destroy_mesh()
    return out


# --------------------------------------------------------------------------- report


def _slowest(per_rank: list[dict], key: str) -> list[float]:
    """Per repetition, the slowest rank's time (a collective step lasts until its last rank is done)."""
    return [max(times) for times in zip(*(r[key] for r in per_rank))]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


COLORS = ["grey", "tab:blue", "tab:orange", "silver"]
TARGETS = {"vs_transformers_tp": 0.85, "vs_one_process": 1.1, "memory_vs_whole": 0.6}


def run(directory: str, dims: LlamaDims, batch: int, seq: int, warmup: int, reps: int, tp: int) -> dict:
    """Every contender on the checkpoint in ``directory``; medians, ratios and logits errors."""
    args = (directory, dims, batch, seq, warmup, reps)
    cores = os.cpu_count() or 1
    runs = {   # (threads per rank, results per rank)
        "1 process": (cores, run_ranks(one_process, 1, *args, threads_per_rank=cores, timeout=3600)),
        f"plait tp={tp} (shm)": (1, run_ranks(plait_tp, tp, *args, timeout=3600)),
    }
    if transformers_tp_available(f"transformers tp={tp}"):
        runs[f"transformers tp={tp}"] = (1, run_ranks(transformers_tp, tp, *args, timeout=3600))
    runs["1 process, 1 thread (context)"] = (1, run_ranks(one_process, 1, *args, timeout=3600))
    reference = runs["1 process"][1][0]["logits"]
    contenders = {}
    for name, (threads, per_rank) in runs.items():
        contenders[name] = dict(
            ranks=len(per_rank), threads_per_rank=threads,
            step_ms=statistics.median(_slowest(per_rank, "step_ms")),
            prefill_ms=statistics.median(_slowest(per_rank, "prefill_ms")),
            step_ms_all=_slowest(per_rank, "step_ms"), prefill_ms_all=_slowest(per_rank, "prefill_ms"),
            load_peak_mib=[r["load_peak"] / 2 ** 20 for r in per_rank],
            during_load_mib=[r["during_load"] / 2 ** 20 for r in per_rank],
            logits_rel_error=_relative_error(per_rank[0]["logits"], reference))
    one, plait_ = contenders["1 process"], contenders[f"plait tp={tp} (shm)"]
    hf_tp = contenders.get(f"transformers tp={tp}")
    ratios = {
        "step_vs_transformers_tp": plait_["step_ms"] / hf_tp["step_ms"] if hf_tp else None,
        "prefill_vs_transformers_tp": plait_["prefill_ms"] / hf_tp["prefill_ms"] if hf_tp else None,
        "step_vs_one_process": plait_["step_ms"] / one["step_ms"],
        "prefill_vs_one_process": plait_["prefill_ms"] / one["prefill_ms"],
        "load_memory_vs_whole_model": max(plait_["load_peak_mib"]) / one["load_peak_mib"][0],
    }
    return dict(contenders=contenders, ratios=ratios, targets=TARGETS)


def _round(value):
    return "-" if value is None else round(value, 3)


def table(result: dict) -> dict:
    columns = ["contender", "ranks x threads", "step ms (fwd+bwd)", "prefill ms",
               "load + weights read: peak MiB per rank", "logits rel. error vs 1 process"]
    rows = [[name, f"{c['ranks']} x {c['threads_per_rank']}", round(c["step_ms"], 1), round(c["prefill_ms"], 1),
             " / ".join(f"{m:.0f}" for m in c["load_peak_mib"]), f"{c['logits_rel_error']:.1e}"]
            for name, c in result["contenders"].items()]
    r, t = result["ratios"], result["targets"]
    rows += [["plait / transformers tp (step, prefill)", f"target <= {t['vs_transformers_tp']}",
              _round(r["step_vs_transformers_tp"]), _round(r["prefill_vs_transformers_tp"]), "", ""],
             ["plait / 1 process (step, prefill)", f"target <= {t['vs_one_process']}",
              round(r["step_vs_one_process"], 3), round(r["prefill_vs_one_process"], 3), "", ""],
             ["plait load / whole model (memory)", f"target <= {t['memory_vs_whole']}", "", "",
              round(r["load_memory_vs_whole_model"], 3), ""]]
    return {"columns": columns, "rows": rows}


def plot(result: dict, path: Path) -> bool:
    """Bars of step and prefill time per contender; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(result["contenders"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, label in zip(axes, ("step_ms", "prefill_ms"), ("forward+backward ms", "forward (prefill) ms")):
        ax.bar(names, [result["contenders"][n][key] for n in names], color=COLORS[:len(names)])
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelrotation=20, labelsize=7)
    axes[2].bar(names, [max(result["contenders"][n]["load_peak_mib"]) for n in names], color=COLORS[:len(names)])
    axes[2].set_ylabel("from_pretrained peak MiB per rank")
    axes[2].tick_params(axis="x", labelrotation=20, labelsize=7)
    fig.suptitle("transformers Llama on CPU: median over repetitions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = LlamaDims()
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    for name in ("batch", "seq", "tp", "reps", *asdict(defaults)):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    dims = LlamaDims(**{f: getattr(args, f) for f in asdict(defaults)})
    with tempfile.TemporaryDirectory(prefix="plait-bench-hf-") as directory:
        save_random_llama(directory, dims)
        load_before = os.getloadavg()
        result = run(directory, dims, args.batch, args.seq, args.warmup, args.reps, args.tp)
    result.update(dims=asdict(dims), batch=args.batch, seq=args.seq, warmup=args.warmup, reps=args.reps,
                  load_average_before=list(load_before), load_average_after=list(os.getloadavg()))
    result["table"] = table(result)
    print_table(result["table"]["columns"], result["table"]["rows"])
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    if not args.no_save:
        path = write_result("hf", result, command_line("hf", argv))
        if plot(result, path.with_suffix(".png")):
            print(f"wrote {path.with_suffix('.png')}")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
