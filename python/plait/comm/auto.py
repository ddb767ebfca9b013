"""``Communicator.create("auto", group)``: the best backend per operation, chosen once per group.

At creation (collective over the group) the ranks compare hosts and the group's
engines, and the communicator settles a route for each kind of tensor:

=============  ===========================================  ==========================
tensors        route                                        when
=============  ===========================================  ==========================
CPU            ``shm``                                      every rank on this host,
                                                            plait._C has shm, setup OK
               ``hier`` (shm inside hosts, gloo between;    ranks on several hosts, the
               all_reduce, all_gather, broadcast; the       same number on each, some
               rest torch)                                  host with two or more, gloo
               ``torch`` (gloo)                             otherwise
CUDA           ``ipc`` up to ``ipc_max_bytes``, then torch  every rank on this host
                                                            with P2P access, ipc built
               ``torch`` (NCCL)                             otherwise
=============  ===========================================  ==========================

Reductions of dtypes the chosen backend does not reduce (shm: e.g. int8, complex; ipc: anything
but float32/float16/bfloat16) go to ``torch``.
The choice and its reasons are logged once per communicator, on the group's rank 0,
to the ``plait.comm`` logger at INFO level (``logging.basicConfig(level="INFO")``
shows it). Every rank computes the same routes from the same exchanged facts, so all
ranks send a given operation through the same backend.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import CommError
from .base import Communicator, RanksOfTorch
from .hier import HierCommunicator, HostLayout
from .rendezvous import describe_hosts, hosts_of_group
from .shm_setup import shm_status
from .torch_backend import TorchCommunicator

log = logging.getLogger("plait.comm")

REDUCING_OPS = ("all_reduce", "reduce_scatter")
HIER_OPS = ("all_reduce", "all_gather", "broadcast")  # the rest goes to torch
IPC_MAX_BYTES = 8 << 20  # above this NCCL's ring algorithms win (the usual custom all-reduce cutoff)


@dataclass(frozen=True)
class Route:
    """Which backend serves one kind of tensor, and why."""

    backend: str
    reason: str
    max_bytes: Optional[int] = None  # larger messages go to "torch"


@dataclass(frozen=True)
class Plan:
    cpu: Route
    cuda: Route

    def describe(self) -> str:
        cuda = self.cuda.backend + (f" up to {self.cuda.max_bytes >> 20} MiB, torch above"
                                    if self.cuda.max_bytes is not None else "")
        return (f"CPU tensors -> {self.cpu.backend} ({self.cpu.reason}); "
                f"CUDA tensors -> {cuda} ({self.cuda.reason})")


def plan_routes(size: int, host_keys: list[str], engines: str, shm: tuple[bool, str],
                ipc: tuple[bool, str]) -> Plan:
    """Pure choice from exchanged facts: group size, each rank's host key, the process
    group's engines (e.g. "gloo", "nccl", "cpu:gloo,cuda:nccl") and whether the shm and
    ipc backends can run here (usable, why)."""
    torch_cpu = "torch (gloo)" if "gloo" in engines else "torch"
    torch_cuda = "torch (NCCL)" if "nccl" in engines else torch_cpu
    if size == 1:
        return Plan(Route("torch", "one rank: nothing to send"), Route("torch", "one rank: nothing to send"))
    if len(set(host_keys)) > 1:
        why = f"ranks on several hosts: {describe_hosts(host_keys)}"
        return Plan(_several_hosts_cpu(host_keys, engines, shm, why, torch_cpu), Route("torch", f"{torch_cuda}; {why}"))
    where = f"all {size} ranks on host {host_keys[0].split('|')[0]}"
    cpu = Route("shm", f"{where} share /dev/shm") if shm[0] else Route("torch", f"{torch_cpu}; shm unusable: {shm[1]}")
    if "nccl" not in engines and "gloo" not in engines:
        cpu = Route("torch", f"the group's engine {engines!r} is neither gloo nor nccl")
    cuda = (Route("ipc", f"{where} with P2P access", IPC_MAX_BYTES) if ipc[0]
            else Route("torch", f"{torch_cuda}; ipc unusable: {ipc[1]}"))
    return Plan(cpu, cuda)


def _several_hosts_cpu(host_keys: list[str], engines: str, shm: tuple[bool, str], why: str, torch_cpu: str) -> Route:
    """The CPU route of a group spanning hosts: hierarchical where it applies, else flat gloo saying why not."""
    layout = HostLayout.from_keys(host_keys)
    if "gloo" not in engines:
        return Route("torch", f"{torch_cpu}; {why}; no gloo for hierarchical collectives")
    if not shm[0]:
        return Route("torch", f"{torch_cpu}; {why}; shm unusable: {shm[1]}")
    if not layout.even:
        return Route("torch", f"{torch_cpu}; {why}; hierarchical collectives need the same number of ranks on "
                              f"every host")
    if len(layout.hosts[0]) == 1:
        return Route("torch", f"{torch_cpu}; {why}; one rank per host, nothing to share in memory")
    return Route("hier", f"{why}; shm inside each host, gloo between hosts")


def ipc_status(comm: TorchCommunicator) -> tuple[bool, str]:
    """Whether the CUDA IPC backend can serve this group (collective: checks every rank's device)."""
    if "ipc" not in Communicator._registry:
        return False, "plait's ipc backend is not part of this version"
    return Communicator._registry["ipc"].usable_for(comm)  # type: ignore[attr-defined]


class AutoCommunicator(RanksOfTorch, Communicator):
    """Routes each operation to shm, ipc or torch as planned at creation (module docstring)."""

    backend = "auto"

    def __init__(self, group=None, *, name: Optional[str] = None, timeout_s: Optional[float] = None) -> None:
        self._torch = TorchCommunicator(group, name=name, timeout_s=timeout_s)
        super().__init__(self._torch.name, timeout_s)
        engines = str(dist.get_backend(self._torch.group)).lower()
        hosts = hosts_of_group(self._torch) if self.size > 1 else ["local"]
        plan = plan_routes(self.size, hosts, engines, shm_status(), ipc_status(self._torch))
        self._backends: dict[str, Communicator] = {"torch": self._torch}
        if plan.cpu.backend == "shm":
            try:
                self._backends["shm"] = Communicator.create("shm", group, name=self.name, timeout_s=timeout_s)
            except CommError as exc:  # raised on every rank alike: setup outcomes are exchanged
                plan = Plan(Route("torch", f"shm setup failed: {exc}"), plan.cuda)
        if plan.cpu.backend == "hier":
            try:
                self._backends["hier"] = HierCommunicator(group, name=self.name, timeout_s=timeout_s, host_keys=hosts)
            except CommError as exc:  # raised on every rank alike: set-up outcomes are exchanged
                plan = Plan(Route("torch", f"hierarchical set-up failed: {exc}"), plan.cuda)
        if plan.cuda.backend == "ipc":
            self._backends["ipc"] = Communicator.create("ipc", group, name=self.name, timeout_s=timeout_s)
        self.plan = plan
        if self.rank == 0:
            log.info("plait.comm auto for group %r (global ranks %s): %s", self.name, self.global_ranks,
                     plan.describe())

    def backend_for(self, tensor: torch.Tensor, op: str) -> Communicator:
        """The communicator that carries ``op`` on ``tensor`` (same answer on every rank)."""
        route = self.plan.cuda if tensor.is_cuda else self.plan.cpu
        if route.backend == "torch" or (route.backend == "hier" and op not in HIER_OPS):
            return self._torch
        if route.max_bytes is not None and tensor.numel() * tensor.element_size() > route.max_bytes:
            return self._torch
        chosen = self._backends[route.backend]
        if op in REDUCING_OPS and not chosen.reduces(tensor.dtype):
            return self._torch
        return chosen

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False):
        return self.backend_for(tensor, "all_reduce").all_reduce(tensor, op=op, async_op=async_op)

    def all_gather(self, tensor: torch.Tensor, dim: int = 0, async_op: bool = False):
        return self.backend_for(tensor, "all_gather").all_gather(tensor, dim=dim, async_op=async_op)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0, op: str = "sum", async_op: bool = False):
        return self.backend_for(tensor, "reduce_scatter").reduce_scatter(tensor, dim=dim, op=op, async_op=async_op)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False):
        return self.backend_for(tensor, "broadcast").broadcast(tensor, src=src, async_op=async_op)

    def send(self, tensor: torch.Tensor, dst: int, async_op: bool = False):
        return self.backend_for(tensor, "send").send(tensor, dst=dst, async_op=async_op)

    def recv(self, tensor: torch.Tensor, src: int, async_op: bool = False):
        return self.backend_for(tensor, "recv").recv(tensor, src=src, async_op=async_op)

    def barrier(self) -> None:
        fastest = self._backends.get("shm") or self._torch
        fastest.barrier()

    def close(self) -> None:
        """Close the backends that hold resources (shm segments, cross-host groups)."""
        for backend in self._backends.values():
            if backend is not self._torch and hasattr(backend, "close"):
                backend.close()
