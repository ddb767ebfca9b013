"""ParallelMesh: the (dp, pp, tp) grid of ranks, TP innermost.

Global rank ``r`` sits at coordinates ``(dp_rank, pp_rank, tp_rank)`` with

    r = (dp_rank * pp + pp_rank) * tp + tp_rank

so the ranks of one TP group are consecutive (one node, fast links), the PP
axis comes next and DP is outermost. Launchers number each host's ranks
consecutively, so TP groups stay inside hosts; the mesh checks that they do
(:meth:`~plait.ParallelConfig.check_hosts`) and, when the job spans hosts,
watches them (:mod:`plait.hostwatch`): :meth:`ParallelMesh.host_lost` turns a
failure caused by a vanished host into an error naming it. Each axis has a process group created
with plait's timeout, a :class:`~plait.comm.Communicator`, and the whole grid
is also exposed as a ``torch.distributed.device_mesh.DeviceMesh``
(``mesh.device_mesh``) for DTensor interop.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from .comm import Communicator
from .config import ParallelConfig
from .errors import CommError, default_timeout_s
from .hostwatch import HostMap, HostWatch, explain, gather_hosts
from .launch import free_port
from .nodes import choose_gloo_interface

AXES = ("dp", "pp", "tp")
log = logging.getLogger("plait.mesh")
_CURRENT: Optional["ParallelMesh"] = None


def _init_process_group(world: int, backend: str, timeout: datetime.timedelta) -> None:
    """Start torch.distributed from the torchrun environment, or alone when world is 1."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == "gloo":
            choose_gloo_interface(os.environ.get("MASTER_ADDR"))
        try:
            dist.init_process_group(backend, timeout=timeout)
        except (RuntimeError, TimeoutError) as exc:     # torch's DistError family: store timeouts, refused sockets
            raise CommError(_rendezvous_failure(exc, timeout)) from None
        return
    if world != 1:
        raise ValueError(
            f"dp*pp*tp = {world} needs {world} processes, but this one was not started by "
            f"torchrun (RANK/WORLD_SIZE unset); run: torchrun --nproc-per-node {world} your_script.py")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1, timeout=timeout)


def _rendezvous_failure(exc: BaseException, timeout: datetime.timedelta) -> str:
    """What a rank that could not join the job's rendezvous says: torch's first line, and what to check."""
    env = os.environ
    where = f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
    first = next((line.strip().rstrip(".") for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    node = f" on node {env['GROUP_RANK']}" if "GROUP_RANK" in env else ""
    return (f"rank {env.get('RANK')} of {env.get('WORLD_SIZE')}{node} could not join the job at {where} within "
            f"{timeout.total_seconds():g} s: {first}. Check that every host runs the same command with the same "
            f"--nnodes, its own --node-rank (each once, 0 on the master's host), that the master's host is "
            f"started, and that {where} is reachable from this host")


def _validate_sizes(dp: int, pp: int, tp: int) -> None:
    for axis, size in zip(AXES, (dp, pp, tp)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{axis} must be a positive int, got {size!r}")


@dataclass
class ParallelMesh:
    """A (dp, pp, tp) grid over the initialized process group; see the module doc.

    Build it with :func:`init_mesh`. ``*_rank`` are coordinates on each axis,
    ``*_group`` the ProcessGroup of this rank's axis line, ``*_comm`` its
    Communicator. ``pp_prev`` / ``pp_next`` are the global ranks of the
    neighbouring pipeline stages (None at the ends).
    """

    dp: int
    pp: int
    tp: int
    backend: str
    device: torch.device
    rank: int
    groups: dict[str, dist.ProcessGroup] = field(repr=False)
    comms: dict[str, Communicator] = field(repr=False)
    device_mesh: object = field(repr=False, default=None)
    config: Optional[ParallelConfig] = field(repr=False, default=None)   # the layout it was made from
    hosts: Optional[HostMap] = field(repr=False, default=None)           # every rank's host
    watch: Optional[HostWatch] = field(repr=False, default=None)         # set when the job spans hosts

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def coords(self) -> tuple[int, int, int]:
        """(dp_rank, pp_rank, tp_rank) of this process."""
        return self.coords_of(self.rank)

    def coords_of(self, rank: int) -> tuple[int, int, int]:
        """(dp_rank, pp_rank, tp_rank) of global ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the mesh of {self.world_size} ranks")
        return rank // (self.pp * self.tp), (rank // self.tp) % self.pp, rank % self.tp

    def rank_of(self, dp_rank: int, pp_rank: int, tp_rank: int) -> int:
        """Global rank at the given coordinates."""
        for axis, size, value in zip(AXES, (self.dp, self.pp, self.tp), (dp_rank, pp_rank, tp_rank)):
            if not 0 <= value < size:
                raise ValueError(f"{axis}_rank {value} is outside 0..{size - 1}")
        return (dp_rank * self.pp + pp_rank) * self.tp + tp_rank

    dp_rank = property(lambda self: self.coords[0], doc="Coordinate on the DP axis.")
    pp_rank = property(lambda self: self.coords[1], doc="Coordinate on the PP axis (the stage).")
    tp_rank = property(lambda self: self.coords[2], doc="Coordinate on the TP axis.")
    dp_group = property(lambda self: self.groups["dp"], doc="ProcessGroup of this rank's DP line.")
    pp_group = property(lambda self: self.groups["pp"], doc="ProcessGroup of this rank's PP line.")
    tp_group = property(lambda self: self.groups["tp"], doc="ProcessGroup of this rank's TP line.")
    dp_comm = property(lambda self: self.comms["dp"], doc="Communicator of the DP line.")
    pp_comm = property(lambda self: self.comms["pp"], doc="Communicator of the PP line.")
    tp_comm = property(lambda self: self.comms["tp"], doc="Communicator of the TP line.")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def pp_prev(self) -> Optional[int]:
        """Global rank of the previous pipeline stage, None on the first."""
        dp_rank, pp_rank, tp_rank = self.coords
        return None if pp_rank == 0 else self.rank_of(dp_rank, pp_rank - 1, tp_rank)

    @property
    def pp_next(self) -> Optional[int]:
        """Global rank of the next pipeline stage, None on the last."""
        dp_rank, pp_rank, tp_rank = self.coords
        return None if pp_rank == self.pp - 1 else self.rank_of(dp_rank, pp_rank + 1, tp_rank)

    def host_lost(self, exc: BaseException, hint: str = "") -> Optional[Exception]:
        """After ``exc`` ended a step: an error naming the lost hosts (:class:`~plait.errors.HostLost`, with
        ``exc`` as its cause) when a host of the job vanished, else None. Waits a few seconds to tell
        (:data:`plait.hostwatch.STALE_S`); immediate on a one-host job."""
        lost = explain(self.watch, exc, hint)
        if lost is not None:
            lost.__cause__ = exc
        return lost

    def axis_lines(self, axis: str) -> list[list[int]]:
        """Every group of global ranks along ``axis`` ("dp", "pp" or "tp"), in a fixed order."""
        if axis not in AXES:
            raise ValueError(f"unknown axis {axis!r}; use one of {AXES}")
        grid = torch.arange(self.world_size).view(self.dp, self.pp, self.tp)
        moved = grid.movedim(AXES.index(axis), -1)
        return moved.reshape(-1, moved.shape[-1]).tolist()


def job_fingerprint(sizes: tuple[int, int, int], backend: str, tp_across_hosts: bool = False) -> dict[str, object]:
    """What every rank of a job must have in common: the mesh, the engine, the versions, the timeout."""
    import plait
    from .comm.agree import check_calls_enabled

    return {"(dp, pp, tp)": tuple(sizes), "tp_across_hosts": tp_across_hosts, "backend": backend,
            "torch": torch.__version__,
            "plait": plait.__version__, "PLAIT_TIMEOUT_S": default_timeout_s(),
            "PLAIT_CHECK_CALLS": check_calls_enabled(backend)}


def _check_same_config_everywhere(config: ParallelConfig) -> None:
    """All ranks must ask for the same mesh, with the same engine, versions and timeout: a
    mismatch is a ValueError on every rank, raised by the first collective of the job."""
    from .comm.agree import check_agreement

    backend = str(dist.get_backend())
    check_agreement(job_fingerprint((config.dp, config.pp, config.tp), backend, config.tp_across_hosts), None,
                    what="the job (plait.init_mesh)")


def _watch_hosts(world: int) -> tuple[HostMap, Optional[HostWatch]]:
    """Every rank's host (a collective) and, when they are several, this rank's :class:`HostWatch`."""
    if world == 1:
        return HostMap(["local"], [""], ""), None
    from .comm.torch_backend import TorchCommunicator

    hosts = gather_hosts(TorchCommunicator(None, name="world"))
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if len(hosts.hosts) == 1:
        return hosts, None
    if dist.get_rank() == 0:
        log.info("plait: %d ranks on %d hosts: %s", world, len(hosts.hosts),
                 "; ".join(hosts.describe(h) for h in hosts.hosts))
    if not addr or not port:
        log.warning("plait: MASTER_ADDR/MASTER_PORT unset: no host watch; a lost host shows as a timeout")
        return hosts, None
    return hosts, HostWatch(hosts, dist.get_rank(), addr, int(port))


COMM_BACKENDS = ("torch", "shm", "auto")


def init_mesh(dp: "int | ParallelConfig" = 1, pp: int = 1, tp: int = 1, backend: Optional[str] = None, *,
              comm: str = "torch") -> ParallelMesh:
    """Create the (dp, pp, tp) mesh, initializing torch.distributed if needed.

    ``init_mesh(config)`` takes a :class:`~plait.ParallelConfig` (its sizes; the mesh keeps it as
    ``mesh.config`` for ``parallelize`` and the engines); ``init_mesh(dp, pp, tp)`` makes a default one.

    ``comm`` is the backend of the axes' :class:`~plait.comm.Communicator` objects, which every layer,
    ``parallelize`` and the engines use: ``"torch"`` (the process groups themselves: gloo / NCCL),
    ``"shm"`` (plait's shared-memory collectives; CPU ranks of one host, much faster than gloo for
    the small messages of tensor parallelism) or ``"auto"`` (per tensor, see :mod:`plait.comm.auto`).
    Communicators other than ``"torch"`` are closed by :func:`destroy_mesh`.

    ``backend`` None picks NCCL when CUDA is available, else gloo. Under
    torchrun the process's CUDA device becomes ``cuda:LOCAL_RANK``. A single
    process (no torchrun) may create a 1x1x1 mesh. Raises ValueError when
    ``dp*pp*tp`` differs from the world size or ranks disagree on the sizes.
    """
    global _CURRENT
    if isinstance(dp, ParallelConfig):
        config = dp
        if (pp, tp) != (1, 1):
            raise ValueError("pass either a ParallelConfig or dp, pp, tp sizes to init_mesh, not both")
        dp, pp, tp = config.dp, config.pp, config.tp
    else:
        _validate_sizes(dp, pp, tp)
        config = ParallelConfig(dp=dp, pp=pp, tp=tp)
    world = dp * pp * tp
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None (auto), got {backend!r}")
    if comm not in COMM_BACKENDS:
        raise ValueError(f"comm must be one of {COMM_BACKENDS}, got {comm!r}")
    if comm == "shm" and backend == "nccl":
        raise ValueError("comm='shm' runs CPU collectives, but this mesh is on CUDA (NCCL); use comm='auto' "
                         "(shm for CPU tensors, ipc/NCCL for CUDA) or backend='gloo'")
    timeout = datetime.timedelta(seconds=default_timeout_s())
    if not dist.is_initialized():
        env_world = os.environ.get("WORLD_SIZE")
        if env_world is not None and int(env_world) != world:
            raise ValueError(f"dp*pp*tp = {dp}*{pp}*{tp} = {world}, but torchrun started "
                             f"{env_world} processes; make the product equal the process count")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        _init_process_group(world, backend, timeout)
    if dist.get_world_size() != world:
        raise ValueError(f"dp*pp*tp = {dp}*{pp}*{tp} = {world}, but the process group has "
                         f"{dist.get_world_size()} ranks; make the product equal the world size")
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    _check_same_config_everywhere(config)
    hosts, watch = _watch_hosts(world)
    try:
        config.check_hosts(hosts.labels)
    except ValueError:
        if watch is not None:
            watch.close("refused the layout")
        raise

    rank = dist.get_rank()
    mesh = ParallelMesh(dp=dp, pp=pp, tp=tp, backend=backend, device=device, rank=rank, groups={}, comms={},
                        config=config, hosts=hosts, watch=watch)
    for axis in AXES:
        lines = mesh.axis_lines(axis)
        mine, _ = dist.new_subgroups_by_enumeration(lines, timeout=timeout, backend=backend)
        mesh.groups[axis] = mine
        mesh.comms[axis] = Communicator.create(comm, mine, name=axis)
    mesh.device_mesh = _device_mesh(mesh)
    _CURRENT = mesh
    return mesh


def _device_mesh(mesh: ParallelMesh):
    """The same grid as a DeviceMesh sharing plait's groups (no new communicators)."""
    from torch.distributed.device_mesh import DeviceMesh

    grid = torch.arange(mesh.world_size).view(mesh.dp, mesh.pp, mesh.tp)
    return DeviceMesh.from_group([mesh.groups[a] for a in AXES], mesh.device.type,
                                 mesh=grid, mesh_dim_names=AXES)


def current_mesh() -> Optional[ParallelMesh]:
    """The mesh made by the last :func:`init_mesh` in this process, if any."""
    return _CURRENT


def destroy_mesh(barrier: bool = True) -> None:
    """Forget the current mesh and shut torch.distributed down.

    With ``barrier`` (default) every rank first waits, bounded by the timeout,
    until all ranks got here: a rank that tore its connections down while a
    peer's last transfer was still in flight would make that peer fail.
    """
    global _CURRENT
    mesh, _CURRENT = _CURRENT, None
    if dist.is_initialized():
        if barrier and dist.get_world_size() > 1:
            Communicator.create("torch", None, name="world").barrier()
        if mesh is not None and mesh.watch is not None:
            mesh.watch.close(None if barrier else "stopped after an error")
        for communicator in (mesh.comms.values() if mesh is not None else ()):
            close = getattr(communicator, "close", None)
            if communicator.backend != "torch" and close is not None:
                close()
        dist.destroy_process_group()
