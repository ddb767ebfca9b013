"""Checks of plait.PipelineEngine against the same model run in one process, run inside each rank.

Every check builds all stages from one seed on every rank (cheap, small Linear stacks),
gives the engine this rank's stages and a deep copy of all of them to a plain sequential
reference, feeds both the same batches, and compares the loss and every local
parameter's gradient. Stage widths differ from stage to stage and inputs are
[batch, seq, features], so shapes and headers between stages are exercised too.
"""
from __future__ import annotations

import copy
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import plait
from plait.comm import Communicator
from plait.errors import CommError, CommTimeoutError

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}
HIDDEN = 6


def widths(num_stages: int) -> list[int]:
    return [3 + (s * 5) % 4 for s in range(num_stages + 1)]


def make_stages(num_stages: int, dtype: torch.dtype, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    w = widths(num_stages)
    return [nn.Sequential(nn.Linear(w[s], HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, w[s + 1])).to(dtype)
            for s in range(num_stages)]


def batch(num_stages: int, rows: int, seq: int, dtype: torch.dtype, seed: int,
          device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = widths(num_stages)
    return (torch.randn(rows, seq, w[0], generator=gen, dtype=dtype).to(device),
            torch.randn(rows, seq, w[-1], generator=gen, dtype=dtype).to(device))


def close(what: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    if got.shape != want.shape or not torch.allclose(got, want, **TOL[dtype]):
        err = (got - want).abs().max().item() if got.shape == want.shape else "shape"
        raise AssertionError(f"{what}: differs from one process (max abs err {err})")


def reference_step(stages: list[nn.Module], x: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    for stage in stages:
        stage.zero_grad(set_to_none=True)
    h = x
    for stage in stages:
        h = stage(h)
    loss = F.mse_loss(h, y, reduction=reduction)
    loss.backward()
    return loss.detach()


def check_schedule(mesh, schedule, dtype=torch.float64, reduction="mean", seqs=(3, 3, 5), rows=None,
                   label="", comm=None, device="cpu") -> int:
    """Train steps with the given sequence lengths (a new one makes new headers) and one eval step."""
    stages = [stage.to(device) for stage in make_stages(schedule.num_stages, dtype)]
    reference = copy.deepcopy(stages)
    mine = [stages[s] for s in schedule.stages_of(mesh.pp_rank)]
    loss_fn = (lambda out, tgt: F.mse_loss(out, tgt, reduction=reduction))
    engine = plait.PipelineEngine(mine, mesh, schedule, loss_fn=loss_fn, loss_reduction=reduction, track_memory=True,
                                  comm=comm)
    m = schedule.num_microbatches
    rows = rows or 2 * m + 1  # uneven microbatches: the mean must weight them by size
    where = f"{label or schedule.name} p={schedule.num_ranks} m={m} v={schedule.num_virtual} {dtype} {reduction}"
    sim_peak = schedule.simulate().peak_activations[mesh.pp_rank]
    checks = 0
    for step, seq in enumerate(seqs):
        x, y = batch(schedule.num_stages, rows, seq, dtype, seed=100 + step, device=device)
        for module in mine:
            module.zero_grad(set_to_none=True)
        want = reference_step(reference, x, y, reduction)
        got = engine.train_step(x, y)
        close(f"{where} step {step} seq {seq}: loss", got.to(dtype), want, dtype)
        for s in schedule.stages_of(mesh.pp_rank):
            for (name, p), q in zip(stages[s].named_parameters(), reference[s].parameters()):
                close(f"{where} step {step}: stage {s} {name}.grad", p.grad, q.grad, dtype)
                checks += 1
        if engine.peak_activations != sim_peak:
            raise AssertionError(f"{where}: held {engine.peak_activations} activations at peak, the simulator "
                                 f"says {sim_peak}")
        if engine.activation_bytes_live != 0:
            raise AssertionError(f"{where}: {engine.activation_bytes_live} activation bytes outlived the step")
    x, y = batch(schedule.num_stages, rows, seqs[0], dtype, seed=7, device=device)
    with torch.no_grad():
        h = x
        for stage in reference:
            h = stage(h)
    close(f"{where} eval loss", engine.eval_step(x, y).to(dtype), F.mse_loss(h, y, reduction=reduction), dtype)
    if mesh.pp_rank == schedule.placement[-1]:
        close(f"{where} eval outputs", engine.last_outputs, h, dtype)
    return checks + 1


def cuda_cases(rank: int, world: int) -> int:
    """The engine on CUDA tensors (NCCL): every schedule with p=world, including p=1 with 2 stages."""
    mesh = plait.init_mesh(pp=world)
    count = 0
    for name, v in (("1f1b", 1), ("interleaved", 2), ("zb1p", 1), ("zb1p", 2)):
        if name == "1f1b" and world == 1:
            continue
        for m in (1, 4):
            count += check_schedule(mesh, plait.pp.build_schedule(name, world, m, v), device="cuda",
                                    seqs=(3, 5) if m == 4 else (3,))
    plait.destroy_mesh()
    return count


def v_shape_schedule(m: int):
    """A hand-written GPipe-like schedule with V placement (stages 0, 3 on rank 0; 1, 2 on rank 1)."""
    r0 = [f"0F{i}" for i in range(m)] + [a for i in range(m) for a in (f"3F{i}", f"3B{i}")] + [f"0B{i}" for i in range(m)]
    r1 = [f"1F{i}" for i in range(m)] + [f"2F{i}" for i in range(m)] + [f"2B{i}" for i in range(m)] + \
         [f"1B{i}" for i in range(m)]
    text = f"name: v-shape\nplacement: 0 1 1 0\nrank 0: {' '.join(r0)}\nrank 1: {', '.join(r1)}\n"
    return plait.pp.parse_schedule(text)


def reversed_schedule(m: int):
    """A hand-written schedule whose last stage runs its microbatches last to first, so eval
    outputs come out of order and must be put back in microbatch order."""
    r0 = [f"0F{i}" for i in range(m)] + [f"0B{i}" for i in reversed(range(m))]
    r1 = [a for i in reversed(range(m)) for a in (f"1F{i}", f"1B{i}")]
    return plait.pp.parse_schedule(f"name: reversed\nrank 0: {' '.join(r0)}\nrank 1: {' '.join(r1)}\n")


class SeqFirst(nn.Module):
    """Returns ``[seq, batch, features]`` like the GPT's logits: the batch is not dim 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x).transpose(0, 1)


def seq_first_eval(mesh) -> int:
    """eval_step with a loss on outputs whose batch dim is dim 1 and uneven microbatches (3 + 2 rows):
    the loss is right, and the outputs are kept per microbatch since they do not concatenate on dim 0."""
    stages = make_stages(2, torch.float64)
    stages[1] = nn.Sequential(stages[1], SeqFirst())
    loss_fn = lambda out, tgt: F.mse_loss(out.transpose(0, 1), tgt)  # noqa: E731
    engine = plait.PipelineEngine([stages[mesh.pp_rank]], mesh, "1f1b", num_microbatches=2, loss_fn=loss_fn)
    x, y = batch(2, 5, 4, torch.float64, seed=11)
    with torch.no_grad():
        want = stages[1](stages[0](x))
    close("seq-first eval loss", engine.eval_step(x, y), loss_fn(want, y), torch.float64)
    if mesh.pp_rank == 1:
        close("seq-first eval outputs", torch.cat(engine.last_output_microbatches, dim=1), want, torch.float64)
        try:
            engine.last_outputs
        except ValueError as exc:
            if "last_output_microbatches" not in str(exc):
                raise
        else:
            raise AssertionError("last_outputs concatenated [seq, 3, f] and [seq, 2, f] along dim 0")
    return 1


def engine_cases(rank: int, world: int, transport: str) -> dict:
    """Every schedule for p=world, m in {1, 2, 4, 8}; on p=2 also float32, sum, user schedules.

    ``transport`` "torch": transfers over mesh.pp_comm (gloo); "auto": the engine's default
    (shared memory on one host).
    """
    mesh = plait.init_mesh(pp=world)
    comm = mesh.pp_comm if transport == "torch" else None
    count = 0
    for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb1p", 1), ("zb1p", 2)):
        for m in (1, 2, 4, 8):
            count += check_schedule(mesh, plait.pp.build_schedule(name, world, m, v), comm=comm,
                                    seqs=(3, 3, 5) if m == 4 else (3,))
    peaks = {}
    if world == 2:
        count += check_schedule(mesh, plait.pp.build_schedule("1f1b", 2, 4), dtype=torch.float32)
        count += check_schedule(mesh, plait.pp.build_schedule("zb1p", 2, 4), dtype=torch.float32)
        count += check_schedule(mesh, plait.pp.build_schedule("interleaved", 2, 3, 2), reduction="sum")
        count += check_schedule(mesh, v_shape_schedule(4), seqs=(3, 4))
        count += check_schedule(mesh, reversed_schedule(3), seqs=(3,))
        count += seq_first_eval(mesh)
        lowered = plait.pp.build_schedule("zb1p", 2, 4).lower()
        count += check_schedule(mesh, plait.pp.parse_schedule(lowered.to_text()), label="zb1p from text")
        shm = Communicator.create("shm", mesh.pp_group, name="pp-shm")
        count += check_schedule(mesh, plait.pp.build_schedule("zb1p", 2, 4), comm=shm, label="zb1p over shm")
        count += check_schedule(mesh, plait.pp.build_schedule("interleaved", 2, 4, 2), label="i1f1b auto")
        peaks = activation_peaks(mesh)
        events = timeline(mesh)
    plait.destroy_mesh()
    return {"checks": count, "peaks": peaks, "events": events if world == 2 else None}


def timeline(mesh) -> list:
    """Every rank's events of one zb1p step, gathered on every rank."""
    schedule = plait.pp.build_schedule("zb1p", mesh.pp, 4)
    stages = make_stages(schedule.num_stages, torch.float64)
    engine = plait.PipelineEngine([stages[s] for s in schedule.stages_of(mesh.pp_rank)], mesh, schedule,
                                  loss_fn=F.mse_loss)
    x, y = batch(schedule.num_stages, 8, 4, torch.float64, seed=3)
    engine.train_step(x, y)
    mine = engine.timeline
    gathered = engine.gather_timeline()
    if [e for e in gathered if e.rank == mesh.pp_rank] != mine:
        raise AssertionError("gather_timeline lost or changed this rank's events")
    return gathered


def activation_peaks(mesh) -> dict:
    """Peak bytes saved for backward per schedule with m=8 (1F1B holds fewer microbatches than GPipe)."""
    peaks = {}
    for name in ("gpipe", "1f1b", "zb1p"):
        schedule = plait.pp.build_schedule(name, mesh.pp, 8)
        stages = make_stages(schedule.num_stages, torch.float64)
        engine = plait.PipelineEngine([stages[s] for s in schedule.stages_of(mesh.pp_rank)], mesh, schedule,
                                      loss_fn=F.mse_loss, track_memory=True)
        x, y = batch(schedule.num_stages, 16, 4, torch.float64, seed=3)
        engine.train_step(x, y)
        peaks[name] = (engine.activation_bytes_peak, engine.peak_activations, engine.activation_bytes_live)
    return peaks


def tp_cases(rank: int, world: int) -> int:
    """pp=2 x tp=2: each stage is a tensor-parallel MLP (Column -> Row), compared with dense stages."""
    mesh = plait.init_mesh(pp=2, tp=2)
    count = 0
    for name, v, m in (("1f1b", 1, 4), ("zb1p", 1, 4), ("interleaved", 2, 2)):
        schedule = plait.pp.build_schedule(name, 2, m, v)
        torch.manual_seed(0)
        dense = [nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8)).double()
                 for _ in range(schedule.num_stages)]
        reference = copy.deepcopy(dense)
        mine = [_tp_stage(dense[s]) for s in schedule.stages_of(mesh.pp_rank)]
        engine = plait.PipelineEngine(mine, mesh, schedule, loss_fn=F.mse_loss)
        gen = torch.Generator().manual_seed(5)
        x, y = torch.randn(2 * m, 3, 8, generator=gen, dtype=torch.float64), torch.randn(2 * m, 3, 8, generator=gen,
                                                                                       dtype=torch.float64)
        want = reference_step(reference, x, y, "mean")
        close(f"tp {name}: loss", engine.train_step(x, y), want, torch.float64)
        tp, r = mesh.tp, mesh.tp_rank
        for stage, module in zip(schedule.stages_of(mesh.pp_rank), mine):
            ref = reference[stage]
            close(f"tp {name} stage {stage} col weight", module[0].weight.grad, ref[0].weight.grad.chunk(tp, 0)[r],
                  torch.float64)
            close(f"tp {name} stage {stage} col bias", module[0].bias.grad, ref[0].bias.grad.chunk(tp, 0)[r],
                  torch.float64)
            close(f"tp {name} stage {stage} row weight", module[2].weight.grad, ref[2].weight.grad.chunk(tp, 1)[r],
                  torch.float64)
            close(f"tp {name} stage {stage} row bias", module[2].bias.grad, ref[2].bias.grad, torch.float64)
            count += 4
    plait.destroy_mesh()
    return count


def _tp_stage(dense: nn.Sequential) -> nn.Module:
    return nn.Sequential(plait.ColumnParallelLinear.from_linear(dense[0]), nn.GELU(),
                         plait.RowParallelLinear.from_linear(dense[2]))


def bad_input_cases(rank: int, world: int) -> list[str]:
    """Mistakes raise ValueError on every rank before any communication (the step after still works)."""
    mesh = plait.init_mesh(pp=world)
    stages = make_stages(2 * world, torch.float64)
    mine = [stages[mesh.pp_rank]]
    good = dict(schedule="1f1b", num_microbatches=4, loss_fn=F.mse_loss)
    messages = []

    def expect(call, fragment: str) -> None:
        try:
            call()
        except ValueError as exc:
            if fragment not in str(exc):
                raise AssertionError(f"{fragment!r} not in {exc}") from exc
            messages.append(str(exc).splitlines()[0])
            return
        raise AssertionError(f"no ValueError for {fragment!r}")

    engine = lambda **kw: plait.PipelineEngine(kw.pop("modules", mine), mesh, **{**good, **kw})  # noqa: E731
    expect(lambda: engine(schedule="2f2b"), "unknown schedule")
    expect(lambda: engine(modules=[stages[0], stages[1]]), "runs one stage per rank")
    expect(lambda: engine(modules=[stages[0], stages[1]], num_virtual=1), "needs 1 stage module(s), got 2")
    expect(lambda: engine(schedule="interleaved", num_virtual=2), "needs 2 stage module(s), got 1")
    expect(lambda: engine(schedule=plait.pp.build_schedule("1f1b", world + 1, 4)), "mesh has pp=")
    expect(lambda: engine(schedule=plait.pp.build_schedule("1f1b", world, 4), num_microbatches=3), "agree")
    expect(lambda: engine(num_microbatches=None), "num_microbatches is required")
    expect(lambda: engine(loss_reduction="avg"), "'mean' or 'sum'")
    expect(lambda: engine(modules=[]), "non-empty sequence")
    expect(lambda: engine(loss_fn=None).train_step(None, None), "pass loss_fn")
    broken = plait.pp.parse_schedule("rank 0: 0F0 0B0\nrank 1: 1B0 1F0")
    expect(lambda: engine(schedule=broken, num_microbatches=None), "needs 1F0")
    ok = engine()
    x, y = batch(world, 3, 2, torch.float64, seed=1)
    expect(lambda: ok.train_step(x, y), "fewer than num_microbatches=4")  # 3 rows, 4 microbatches
    first, last = mesh.pp_rank == 0, mesh.pp_rank == world - 1
    x, y = batch(world, 8, 2, torch.float64, seed=1)
    # Each rank gets the mistake that concerns it: the first stage no inputs, the last no targets.
    expect(lambda: ok.train_step(None if first else x, y if first else None), "needs inputs" if first else "needs targets")
    loss = ok.train_step(x, y)  # nothing was sent: the engine is still usable
    if not torch.isfinite(loss):
        raise AssertionError("the step after the rejected ones failed")
    plait.destroy_mesh()
    return messages


def dead_peer(rank: int, world: int, mode: str, transport: str) -> str:
    """Rank 1 stops taking part after one step (``mode``: "hang" sleeps, "exit" ends its process)."""
    mesh = plait.init_mesh(pp=world)
    stages = make_stages(world, torch.float64)
    engine = plait.PipelineEngine([stages[rank]], mesh, "1f1b", num_microbatches=2, loss_fn=F.mse_loss,
                                  comm=mesh.pp_comm if transport == "torch" else None)
    x, y = batch(world, 4, 2, torch.float64, seed=1)
    engine.train_step(x, y)
    if rank == 1:
        if mode == "hang":
            time.sleep(float(os.environ["PLAIT_TIMEOUT_S"]) + 1.5)
        return "stopped"
    start = time.monotonic()
    try:
        engine.train_step(x, y)
    except (CommTimeoutError, CommError) as exc:
        return f"{type(exc).__name__} after {time.monotonic() - start:.1f}s: {exc}"
    return "no error"
