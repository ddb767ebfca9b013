"""Communicator.create("auto"): the route plan from exchanged facts, and real groups using it."""
import logging

import torch

from plait.comm.auto import IPC_MAX_BYTES, plan_routes
from plait.launch import run_ranks

HOST_A = "node-a|boot1|44:1"
HOST_B = "node-b|boot2|44:1"


def test_plan_one_host_cpu_goes_to_shm():
    plan = plan_routes(2, [HOST_A, HOST_A], "gloo", (True, "ok"), (False, "no ipc here"))
    assert plan.cpu.backend == "shm" and "all 2 ranks on host node-a" in plan.cpu.reason
    assert plan.cuda.backend == "torch" and "no ipc here" in plan.cuda.reason


def test_plan_several_hosts_naming_them_cpu_hierarchical_cuda_torch():
    plan = plan_routes(4, [HOST_A, HOST_A, HOST_B, HOST_B], "cpu:gloo,cuda:nccl", (True, "ok"), (True, "ok"))
    for route in (plan.cpu, plan.cuda):
        assert "several hosts" in route.reason and "node-a: ranks [0, 1]" in route.reason
        assert "node-b: ranks [2, 3]" in route.reason
    assert plan.cpu.backend == "hier" and "gloo between hosts" in plan.cpu.reason   # tests/test_comm_hier.py
    assert plan.cuda.backend == "torch" and "NCCL" in plan.cuda.reason


def test_plan_unusable_shm_and_single_rank():
    plan = plan_routes(2, [HOST_A, HOST_A], "gloo", (False, "/dev/shm is missing or not writable"), (False, "x"))
    assert plan.cpu.backend == "torch" and "/dev/shm is missing" in plan.cpu.reason
    plan = plan_routes(1, [HOST_A], "gloo", (True, "ok"), (True, "ok"))
    assert plan.cpu.backend == plan.cuda.backend == "torch" and "one rank" in plan.cpu.reason


def test_plan_cuda_ipc_for_small_messages_only():
    plan = plan_routes(2, [HOST_A, HOST_A], "nccl", (True, "ok"), (True, "ok"))
    assert plan.cuda.backend == "ipc" and plan.cuda.max_bytes == IPC_MAX_BYTES
    assert "ipc up to 8 MiB, torch above" in plan.describe()


def auto_group(rank: int, world: int, split_hosts: bool) -> dict:
    import torch.distributed as dist

    import plait.comm.auto as auto
    from plait.comm import Communicator

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("plait.comm").addHandler(Keep())
    logging.getLogger("plait.comm").setLevel(logging.INFO)
    if split_hosts:  # pretend each rank runs on its own machine
        auto.hosts_of_group = lambda comm: [f"node-{r}|boot{r}|1:1" for r in range(comm.size)]
    dist.init_process_group("gloo")
    comm = Communicator.create("auto", None, name="tp")
    x = torch.full((1000,), float(rank + 1))
    small = torch.ones(4, dtype=torch.int8)
    routes = {"float32": type(comm.backend_for(x, "all_reduce")).backend,
              "int8 all_reduce": type(comm.backend_for(small, "all_reduce")).backend,
              "int8 all_gather": type(comm.backend_for(small, "all_gather")).backend}
    assert torch.equal(comm.all_reduce(x), torch.full((1000,), float(world * (world + 1) // 2)))
    assert torch.equal(comm.all_reduce(small), torch.full((4,), world, dtype=torch.int8))
    assert comm.all_gather(torch.tensor([rank]), dim=0).tolist() == list(range(world))
    box = torch.empty(3)
    handle = comm.send(torch.full((3,), float(rank)), dst=(rank + 1) % world, async_op=True)
    comm.recv(box, src=(rank - 1) % world)
    handle.wait()
    assert box.tolist() == [float((rank - 1) % world)] * 3
    comm.barrier()
    dist.destroy_process_group()
    return {"routes": routes, "log": records}


def test_auto_on_one_host_uses_shm_and_logs_once():
    first, second = run_ranks(auto_group, 2, False)
    assert first["routes"] == second["routes"] == {"float32": "shm", "int8 all_reduce": "torch",
                                                   "int8 all_gather": "shm"}
    assert len(first["log"]) == 1 and second["log"] == []
    line = first["log"][0]
    assert "group 'tp'" in line and "CPU tensors -> shm (all 2 ranks on host" in line
    assert "CUDA tensors -> torch" in line


def test_auto_across_hosts_falls_back_to_torch():
    first, _ = run_ranks(auto_group, 2, True)
    assert set(first["routes"].values()) == {"torch"}
    assert "several hosts" in first["log"][0] and "node-0: ranks [0]" in first["log"][0]
