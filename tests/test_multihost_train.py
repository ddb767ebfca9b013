"""``plait train`` and ``plait generate`` on two test hosts (tests/hosts.py: own address, hostname and
/dev/shm each; files shared like NFS), against the one-process computation.

- 2 hosts x 2 ranks: dp=2 across the hosts and pp=2 across them, tp=2 inside each, equal test_train's
  plain transformers loop to 1e-9 (float64); the mesh names the hosts and refuses a TP group across them;
- the same through the command line (slow): dp across with plait's own launcher
  (``--nnodes/--node-rank/--master-addr``), pp across under ``torchrun --nnodes 2``, and ``plait generate``
  under torchrun's c10d rendezvous and plait's launcher;
- a host whose link is cut (or whose processes are killed) ends the job on the other host within the
  collective timeout, with an error naming it (the job launched with plait's launcher, its losses up to then
  equal to one process); ``--resume latest`` on the remaining host, another layout, continues exactly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from hf_models import VOCAB, save_tiny

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

SEQ, BATCH = 8, 4
TIMEOUT_S = 10          # PLAIT_TIMEOUT_S of the jobs: bounds how long a lost host can hold the others


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")           # under /tmp: every test host sees it
    save_tiny("llama", root / "model")
    np.random.default_rng(0).integers(0, VOCAB, 7 * SEQ + 1).astype(np.uint16).tofile(root / "data.bin")
    return {"model": str(root / "model"), "data": str(root / "data.bin"), "root": root}


def train_args(files, steps: int, *layout: str) -> list[str]:
    return ["train", "--model", files["model"], "--data", files["data"], "--seq", str(SEQ), "--global-batch",
            str(BATCH), "--steps", str(steps), "--lr", "3e-3", "--dtype", "float64", "--lr-schedule", "constant",
            "--clip-grad", "0", "--json", *layout]


def reference(files, steps: int) -> list[float]:
    from test_train import reference_losses

    return reference_losses(files, steps=steps)


def losses_of(stdout: str) -> list[float]:
    return [json.loads(line)["loss"] for line in stdout.splitlines() if line.startswith('{"step"')]


def assert_losses(got: list[float], want: list[float], what: str) -> None:
    assert len(got) == len(want), f"{what}: {got}"
    for step, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= 1e-9 * abs(w), f"{what}: step {step + 1} loss {g!r} != one process {w!r}"


def on_hosts(hosts, argvs: list[list[str]], timeout: float = 600, env: dict | None = None) -> list[tuple]:
    """Run ``argvs[i]`` on host i at once; (returncode, stdout, stderr) per host."""
    procs = [host.popen(argv, env={"PLAIT_TIMEOUT_S": str(TIMEOUT_S), **(env or {})}, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True) for host, argv in zip(hosts, argvs)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def plait_nodes(hosts, args: list[str]) -> list[list[str]]:
    return [[sys.executable, "-m", "plait", *args, "--nnodes", str(len(hosts)), "--node-rank", str(i),
             "--master-addr", hosts.master_addr, "--master-port", str(hosts.master_port)] for i in range(len(hosts))]


@pytest.mark.slow
def test_dp_across_hosts_tp_inside_equals_one_process_plait_launcher(make_hosts, files):
    hosts = make_hosts(2)
    results = on_hosts(hosts, plait_nodes(hosts, train_args(files, 3, "--dp", "2", "--tp", "2")))
    for i, (code, _, err) in enumerate(results):
        assert code == 0, f"host {i}: {err[-3000:]}"
    assert_losses(losses_of(results[0][1]), reference(files, 3), "(dp 2 across hosts, tp 2 inside)")
    assert losses_of(results[1][1]) == []                 # node 0 reports


def _layouts_on_hosts(rank: int, world: int, jobs: list[dict]) -> tuple:
    """On every rank of 2 hosts x 2: the mesh's refusal of tp=4, its hosts, then each job's losses."""
    import torch.distributed as dist

    import plait
    from plait.train import TrainJob, train_rank

    try:
        plait.init_mesh(plait.ParallelConfig(tp=4))          # starts torch.distributed from the environment
        refused = None
    except ValueError as err:
        refused = str(err)
    mesh = plait.init_mesh(plait.ParallelConfig(dp=2, tp=2))
    hosts, watched = mesh.hosts.labels, mesh.watch is not None
    mesh.watch.close()
    losses = [[r.loss for r in train_rank(TrainJob.from_dict(job), show=False).records] for job in jobs]
    dist.destroy_process_group()
    return refused, hosts, watched, losses


def test_layouts_across_hosts_equal_one_process(make_hosts, files):
    """dp 2 across the hosts and pp 2 across them, tp 2 inside each, in one launch of 2 hosts x 2 ranks."""
    hosts = make_hosts(2)
    base = dict(model=files["model"], data=files["data"], seq=SEQ, global_batch=BATCH, steps=3, lr=3e-3,
                dtype="float64", lr_schedule="constant", clip_grad=0.0)
    jobs = [dict(base, dp=2, tp=2), dict(base, pp=2, tp=2, microbatches=2)]
    want = reference(files, 3)
    for rank, (refused, labels, watched, losses) in enumerate(hosts.run_ranks(_layouts_on_hosts, 2, jobs,
                                                                              env={"PLAIT_TIMEOUT_S": "30"})):
        assert refused is not None and "tp=4 puts TP group ranks 0-3 on 2 hosts (host0: ranks 0-1; host1: ranks " \
                                      "2-3)" in refused, refused
        assert labels == ["host0", "host0", "host1", "host1"] and watched
        assert_losses(losses[0], want, f"rank {rank} (dp 2 across hosts, tp 2 inside)")
        assert_losses(losses[1], want, f"rank {rank} (pp 2 across hosts, tp 2 inside)")


def torchrun(hosts, index: int, *rest: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(hosts)), "--nproc-per-node", "2",
            *rest, "-m", "plait"]


@pytest.mark.slow
def test_pp_across_hosts_under_torchrun(make_hosts, files):
    hosts = make_hosts(2)
    argvs = [torchrun(hosts, i, "--node-rank", str(i), "--master-addr", hosts.master_addr, "--master-port",
                      str(hosts.master_port))
             + train_args(files, 3, "--pp", "2", "--tp", "2", "--microbatches", "2") for i in range(2)]
    results = on_hosts(hosts, argvs)
    for i, (code, _, err) in enumerate(results):
        assert code == 0, f"host {i}: {err[-3000:]}"
    assert_losses(losses_of(results[0][1]), reference(files, 3), "(pp 2 across hosts, tp 2 inside) torchrun")


@pytest.mark.slow
def test_generate_across_hosts(make_hosts, tmp_path_factory):
    """pp 2 across the hosts, tp 2 inside: under torchrun's c10d rendezvous, then with plait's own launcher."""
    from serve_models import reference_greedy, save_model

    directory = save_model("llama", tmp_path_factory.mktemp("generate") / "tiny", seed=3)
    hosts = make_hosts(2)
    prompt = [2, 5, 7, 9]
    want = reference_greedy(directory, prompt, 8)
    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{hosts[0].name}:{hosts.master_port}", "--rdzv-id", "gen"]
    args = ["generate", "--model", directory, "--pp", "2", "--tp", "2", "--dtype", "float64", "--prompt-ids",
            ",".join(map(str, prompt)), "--max-new-tokens", "8", "--json"]
    for argvs in ([torchrun(hosts, i, *rdzv) + args for i in range(2)], plait_nodes(hosts, args)):
        results = on_hosts(hosts, argvs)
        for i, (code, _, err) in enumerate(results):
            assert code == 0, f"host {i}: {err[-3000:]}"
        printed = [json.loads(line) for _, out, _ in results for line in out.splitlines() if line.startswith("{")]
        assert len(printed) == 1                         # rank 0 prints (node 0 with plait's launcher)
        assert printed[0]["token_ids"] == want


@pytest.mark.parametrize("how", ["cut", pytest.param("kill", marks=pytest.mark.slow)])
def test_lost_host_ends_the_job_naming_it_and_resume_continues(make_hosts, files, tmp_path, how):
    """Host 1 goes away in the middle of a long job (dp 2 across hosts, tp 2 inside, a checkpoint every 2
    steps); host 0 stops within the timeout naming host 1; host 0 alone resumes on (dp 1, tp 2)."""
    hosts = make_hosts(2)
    save = str(tmp_path / "ck")
    args = train_args(files, 10_000, "--dp", "2", "--tp", "2", "--save", save, "--save-every", "2", "--keep", "2")
    procs = [hosts[i].popen(argv, env={"PLAIT_TIMEOUT_S": str(TIMEOUT_S)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i, argv in enumerate(plait_nodes(hosts, args))]
    errors = {}
    readers = [threading.Thread(target=lambda i=i: errors.setdefault(i, procs[i].stderr.read())) for i in range(2)]
    for reader in readers:
        reader.start()
    before = []
    for line in procs[0].stdout:                          # a few steps and two checkpoints, then the loss
        before.append(line)
        if line.startswith('{"step": 5,'):
            break
    lost_at = time.monotonic()
    hosts.cut(1) if how == "cut" else hosts[1].kill()
    rest = procs[0].stdout.read()
    assert procs[0].wait(timeout=120) == 2, rest[-2000:]
    ended = time.monotonic() - lost_at
    readers[0].join()
    assert '"summary"' not in rest                         # it did not run to its end
    assert ended < TIMEOUT_S + 10, f"host 0 took {ended:.1f} s to stop"
    message = errors[0].strip().splitlines()[-1]
    assert message.startswith("plait train: error:") and "HostLost" in message, errors[0][-3000:]
    assert f"lost host host1 ({hosts[1].addr}; ranks 2-3)" in message and "--resume latest" in message, message

    from plait.train.checkpoint import step_dirs

    done = int(step_dirs(save)[-1].name.split("-")[1])
    assert done >= 4
    want = reference(files, done + 2)
    assert_losses(losses_of("".join(before)), want[:5], "(dp 2 across hosts, tp 2 inside) before the loss")
    resumed = hosts[0].run([sys.executable, "-m", "plait", *train_args(files, done + 2, "--tp", "2", "--save", save,
                                                                       "--resume", "latest")], timeout=300)
    assert_losses(losses_of(resumed.stdout), want[done:], f"resumed at step {done} on (1,1,2)")
    if how == "cut":                                       # the cut-off host stops too, blaming host 0 or its link
        assert procs[1].wait(timeout=120) == 2
        readers[1].join()
        assert "lost host host0" in errors[1] and "or this host's network" in errors[1], errors[1][-2000:]
