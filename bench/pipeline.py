"""Pipeline schedules: plait's PipelineEngine vs torch.distributed.pipelining, and measured vs simulated bubble.

    python bench/pipeline.py [--world 4] [--microbatches 8] [--hidden 256] [--rows 64] [--blocks 8]
    plait bench pipeline ...

The model is ``--blocks`` MLP blocks (Linear(H, 4H) -> GELU -> Linear(4H, H)) cut into
``world * v`` equal stages, trained with an MSE loss on a batch of ``microbatches * rows``
rows. Each schedule runs on plait and on its torch counterpart with the identical model,
data and microbatching:

    plait          torch.distributed.pipelining
    gpipe          ScheduleGPipe
    1f1b           Schedule1F1B
    interleaved/2  ScheduleInterleaved1F1B (2 stages per rank)
    zb1p/1         ScheduleInterleavedZeroBubble (1 stage per rank)
    zb1p/2         ScheduleInterleavedZeroBubble (2 stages per rank)

CPU: fp32, one thread per rank; torch's pipelining sends over gloo, plait over its default
transport (the "auto" communicator: shared memory on one host) and, for the same-transport
comparison, also over gloo ("plait gloo ms"). GPU: NCCL, bf16, one GPU per rank (needs
``--world`` GPUs; NCCL cannot put two ranks on one GPU). A step's time is the slowest rank's; the
figure is the median over ``--iters`` steps after ``--warmup``. The measured bubble is
1 - compute time / (ranks x step time), averaged over ``--timeline-steps`` more plait steps
(the last one's time is split in the JSON into posting transfers, waiting and the rest); the simulated one is ``Schedule.simulate``
with that step's measured mean time of each action kind per stage, once with compute alone
and once charging each action the time spent posting its transfers plus a measured
transfer latency (``p2p``: median time from a send's post to the end of the wait for it).
Contenders alternate step by step, so drifting load from other processes hits all alike.
Gradients of the two implementations are compared after one step from the same weights.
Results go to bench/results/pipeline-*.json, Gantt charts of plait's steps to the .png
beside it (when matplotlib is installed).
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

import plait
from plait.bench.common import bench_parser, command_line, positive_int, print_table, ranks, repeats, size, write_result
from plait.launch import run_ranks
from plait.pp import build_schedule, gantt_png, measured_bubble

CONFIGS = (("gpipe", 1, "ScheduleGPipe"), ("1f1b", 1, "Schedule1F1B"),
           ("interleaved", 2, "ScheduleInterleaved1F1B"), ("zb1p", 1, "ScheduleInterleavedZeroBubble"),
           ("zb1p", 2, "ScheduleInterleavedZeroBubble"))


def _setup(rank: int, world: int):
    if torch.cuda.is_available():
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        return device, torch.bfloat16, "nccl"
    return torch.device("cpu"), torch.float32, "gloo"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stage_modules(num_blocks: int, num_stages: int, hidden: int) -> list[nn.Module]:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
              for _ in range(num_blocks)]
    per = num_blocks // num_stages
    return [nn.Sequential(*blocks[s * per:(s + 1) * per]) for s in range(num_stages)]


def _timed_together(steps: dict, mesh, device, warmup: int, iters: int) -> dict[str, list[float]]:
    """Time several step functions, alternating them every iteration so load drifts hit all alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            mesh.pp_comm.barrier()
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, values in times.items():
        slowest = mesh.pp_comm.all_reduce(torch.tensor(values, dtype=torch.float64, device=device), op="max")
        out[name] = slowest.tolist()
    return out


def _stage_costs(events, num_stages: int, overheads: bool) -> dict:
    """Mean measured time (ms) of each action kind per stage, for the simulator.

    With ``overheads`` each compute action is charged the time its rank spent posting
    the transfers right before it (receives) and after it (sends) as well.
    """
    charged: dict = {}
    for rank in {e.rank for e in events}:
        mine = sorted((e for e in events if e.rank == rank), key=lambda e: e.start)
        computes = [e for e in mine if e.category == "compute"]
        for e in computes:
            charged[(rank, e.start)] = e.end - e.start
        if overheads:
            for e in (e for e in mine if e.category == "post"):
                after = next((c for c in computes if c.start >= e.end), None)
                before = max((c for c in computes if c.end <= e.start), key=lambda c: c.end, default=None)
                owner = after if (e.action.kind.value.startswith("RECV") and after) or before is None else before
                if owner is not None:
                    charged[(rank, owner.start)] += e.end - e.start
    sums: dict = defaultdict(list)
    for e in events:
        if e.category == "compute":
            sums[(e.action.kind.value, e.action.stage)].append(charged[(e.rank, e.start)] * 1e3)
    mean = {key: statistics.fmean(v) for key, v in sums.items()}
    forward = [mean[("F", s)] for s in range(num_stages)]
    if ("B", 0) in mean:
        return dict(forward=forward, backward=[mean[("B", s)] for s in range(num_stages)])
    weight = [mean[("W", s)] for s in range(num_stages)]
    return dict(forward=forward, backward=[mean[("I", s)] + w for s, w in enumerate(weight)], weight=weight)


def _p2p_latency(events) -> float:
    """Median time (ms) from a send being posted to the end of the receiver's wait for it, over the
    transfers a receiver actually waited for: the transfer cost the simulator can add."""
    sent = {}
    for e in events:
        if e.category == "post" and e.action.kind.value.startswith("SEND"):
            step = 1 if e.action.kind.value == "SEND_F" else -1
            sent[(e.action.kind.value[-1], e.action.stage + step, e.action.microbatch)] = e.end
    latencies = [(e.end - sent[key]) * 1e3 for e in events if e.category == "wait" and e.end - e.start > 1e-5
                 for key in [(e.action.kind.value[-1], e.action.stage, e.action.microbatch)] if key in sent]
    return max(0.0, statistics.median(latencies)) if latencies else 0.0


def _breakdown(events, world: int) -> dict:
    """Shares of rank-time (ranks x step) spent computing, posting transfers, waiting for them, and else."""
    span = max(e.end for e in events) - min(e.start for e in events)
    total = {c: sum(e.end - e.start for e in events if e.category == c) / (world * span)
             for c in ("compute", "post", "wait")}
    total["other"] = 1.0 - sum(total.values())
    return {k: round(v, 4) for k, v in total.items()}


def _torch_step(schedule, rank: int, first: int, last: int, x, y):
    def step():
        if rank == first:
            schedule.step(x)
        elif rank == last:
            schedule.step(target=y, losses=[])
        else:
            schedule.step()
    return step


def bench_rank(rank: int, world: int, cfg: dict) -> list[dict]:
    from torch.distributed import pipelining

    device, dtype, backend = _setup(rank, world)
    mesh = plait.init_mesh(pp=world, backend=backend)
    m, hidden = cfg["microbatches"], cfg["hidden"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m * cfg["rows"], hidden, generator=gen).to(device, dtype)
    y = torch.randn(m * cfg["rows"], hidden, generator=gen).to(device, dtype)
    out = []
    for name, v, torch_name in cfg["configs"]:
        schedule = build_schedule(name, world, m, v)
        stages = _stage_modules(cfg["blocks"], world * v, hidden)
        mine = schedule.stages_of(rank)
        copies = {key: [copy.deepcopy(stages[s]).to(device, dtype) for s in mine]
                  for key in ("plait", "torch", "plait_gloo")}
        engine = plait.PipelineEngine(copies["plait"], mesh, schedule, loss_fn=F.mse_loss)
        pipe_stages = [pipelining.PipelineStage(mod, s, world * v, device, group=mesh.pp_group)
                       for mod, s in zip(copies["torch"], mine)]
        cls = getattr(pipelining, torch_name)
        single = v == 1 and torch_name in ("ScheduleGPipe", "Schedule1F1B")
        torch_schedule = cls(pipe_stages[0] if single else pipe_stages, n_microbatches=m, loss_fn=F.mse_loss)
        torch_step = _torch_step(torch_schedule, rank, schedule.placement[0], schedule.placement[-1], x, y)
        steps = {"plait": lambda: engine.train_step(x, y), "torch": torch_step}
        if device.type == "cpu" and cfg["gloo"]:  # the default transport on CPU is "auto" (shared memory)
            gloo_engine = plait.PipelineEngine(copies["plait_gloo"], mesh, schedule, loss_fn=F.mse_loss,
                                               comm=mesh.pp_comm)
            steps["plait_gloo"] = lambda: gloo_engine.train_step(x, y)

        def zeroed(step, modules):
            def run():
                for module in modules:
                    module.zero_grad(set_to_none=True)
                step()
            return run

        steps = {key: zeroed(step, copies[key]) for key, step in steps.items()}
        times = _timed_together(steps, mesh, device, cfg["warmup"], cfg["iters"])
        measured, sims, sims_full, p2ps = [], [], [], []
        for _ in range(cfg["timeline_steps"]):  # fresh steps for the timeline (the last one also for grads)
            steps["plait"]()
            events = engine.gather_timeline()
            measured.append(measured_bubble(events, world)["bubble_fraction"])
            sims.append(schedule.simulate(**_stage_costs(events, world * v, overheads=False)).bubble_fraction)
            p2ps.append(_p2p_latency(events))
            sims_full.append(schedule.simulate(**_stage_costs(events, world * v, overheads=True),
                                               p2p=p2ps[-1]).bubble_fraction)
        steps["torch"]()
        diff = max((a.grad.float() - b.grad.float()).abs().max().item()
                   for ma, mb in zip(copies["plait"], copies["torch"]) for a, b in zip(ma.parameters(), mb.parameters()))
        diff = mesh.pp_comm.all_reduce(torch.tensor([diff], dtype=torch.float64, device=device), op="max").item()
        row = {"schedule": name, "num_virtual": v, "torch_schedule": torch_name, "backend": backend,
               "plait_ms": statistics.median(times["plait"]), "torch_ms": statistics.median(times["torch"]),
               "times_ms": times, "measured_bubble": statistics.fmean(measured),
               "simulated_bubble": statistics.fmean(sims), "unit_cost_bubble": schedule.simulate().bubble_fraction,
               "simulated_bubble_with_overheads": statistics.fmean(sims_full), "p2p_latency_ms": statistics.fmean(p2ps),
               "bubble_per_step": {"measured": measured, "simulated": sims, "simulated_with_overheads": sims_full},
               "time_shares": _breakdown(events, world),
               "peak_activations": engine.peak_activations, "max_grad_diff_vs_torch": diff,
               "events": [(e.rank, str(e.action), e.category, e.start, e.end) for e in events] if rank == 0 else None}
        if "plait_gloo" in times:
            row["plait_gloo_ms"] = statistics.median(times["plait_gloo"])
        out.append(row)
    plait.destroy_mesh()
    return out


def main(argv=None) -> int:
    parser = bench_parser("pipeline", "plait PipelineEngine vs torch.distributed.pipelining")
    parser.add_argument("--world", type=ranks(), default=4, help="pipeline ranks")
    parser.add_argument("--microbatches", type=positive_int(4096), default=8)
    parser.add_argument("--hidden", type=size(), default=256)
    parser.add_argument("--rows", type=size(), default=64, help="rows per microbatch")
    parser.add_argument("--blocks", type=positive_int(4096), default=8, help="MLP blocks in the model (divisible by world*2)")
    parser.add_argument("--schedules", nargs="+", default=[f"{n}/{v}" for n, v, _ in CONFIGS],
                        help="subset of " + " ".join(f"{n}/{v}" for n, v, _ in CONFIGS))
    parser.add_argument("--warmup", type=repeats(0), default=2)
    parser.add_argument("--timeline-steps", type=repeats(), default=3, help="steps whose bubbles are averaged")
    parser.add_argument("--iters", type=repeats(), default=5)
    parser.add_argument("--no-gloo", dest="gloo", action="store_false",
                        help="CPU: do not also time plait over gloo (torch.distributed) transfers")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON or PNG")
    args = parser.parse_args(argv)
    configs = [c for c in CONFIGS if f"{c[0]}/{c[1]}" in args.schedules]
    if not configs:
        parser.error(f"no known schedule in {args.schedules}")
    for _, v, _ in configs:
        if args.blocks % (args.world * v):
            parser.error(f"--blocks {args.blocks} must be divisible by world*v = {args.world * v}")
    if torch.cuda.is_available() and torch.cuda.device_count() < args.world:
        print(f"this machine has {torch.cuda.device_count()} GPU(s); the GPU benchmark needs --world "
              f"{args.world} GPUs (NCCL cannot put two ranks on one GPU). Use --world "
              f"{torch.cuda.device_count()} or CUDA_VISIBLE_DEVICES= for the CPU benchmark.", file=sys.stderr)
        return 2
    cfg = dict(vars(args), configs=configs)
    rows = run_ranks(bench_rank, args.world, cfg, timeout=3000)[0]
    header = ["schedule", "v", "torch schedule", "plait ms", "torch ms", "plait/torch", "plait gloo ms",
              "bubble measured", "bubble sim. (compute)", "bubble sim. (+posts, p2p)", "bubble unit costs",
              "peak act. rank 0", "max |grad diff|"]
    table = [[r["schedule"], r["num_virtual"], r["torch_schedule"], round(r["plait_ms"], 1), round(r["torch_ms"], 1),
              round(r["plait_ms"] / r["torch_ms"], 3), round(r["plait_gloo_ms"], 1) if "plait_gloo_ms" in r else None,
              round(r["measured_bubble"], 3),
              round(r["simulated_bubble"], 3), round(r["simulated_bubble_with_overheads"], 3),
              round(r["unit_cost_bubble"], 3), r["peak_activations"],
              float(f"{r['max_grad_diff_vs_torch']:.2g}")] for r in rows]
    print_table(header, table)
    if args.no_save:
        return 0
    command = command_line("pipeline", argv)
    events = {f"{r['schedule']}/{r['num_virtual']}": r.pop("events") for r in rows}
    name = "pipeline" if args.world == 4 else f"pipeline-{args.world}ranks"
    path = write_result(name, {"rows": rows, "table": {"columns": header, "rows": table},
                                     "config": {k: v for k, v in vars(args).items() if k != "no_save"},
                                     "threads_per_rank": 1}, command)
    panels = [(f"plait {key} (median step {r['plait_ms']:.0f} ms); the step drawn: bubble "
               f"{r['measured_bubble']:.2f} measured, {r['simulated_bubble']:.2f} simulated", _events(events[key]))
              for key, r in zip(events, rows)]
    png = gantt_png(panels, path.with_suffix(".png"))
    print(f"wrote {path}" + (f" and {png}" if png else " (no PNG: pip install matplotlib)"))
    return 0


def _events(raw: list) -> list:
    from plait.pp import Action, Event

    return [Event(rank, Action.parse(action), category, start, end) for rank, action, category, start, end in raw]


if __name__ == "__main__":
    sys.exit(main())
