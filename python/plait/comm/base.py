"""The Communicator protocol: one API for every communication backend.

All ranks in this API are *group ranks* (0 .. size-1 within the communicator's
group), not global ranks. Every operation takes ``async_op``; the async form
returns a :class:`Handle` whose ``wait()`` returns the result and is bounded by
the communicator's timeout.

Semantics (identical for every backend):

=================  ===========================  ==================================
operation          input                        result
=================  ===========================  ==================================
all_reduce         t (any shape)                t, reduced in place
all_gather         t [..., d, ...]              new tensor, size * d along ``dim``
reduce_scatter     t [..., size*d, ...]         new tensor, d along ``dim``
broadcast          t                            t, overwritten from ``src``
send / recv        t                            recv fills t in place
=================  ===========================  ==================================
"""
from __future__ import annotations

import abc
from typing import Callable, ClassVar, Optional

import torch

from ..errors import check_timeout, default_timeout_s

REDUCE_OPS = ("sum", "max", "min", "avg")


class Handle(abc.ABC):
    """An operation in flight. ``wait()`` returns its result tensor (or None)."""

    @abc.abstractmethod
    def wait(self, timeout_s: Optional[float] = None) -> Optional[torch.Tensor]:
        """Block (on CUDA: make the current stream wait) until the operation is done."""

    @abc.abstractmethod
    def is_completed(self) -> bool:
        """Whether the operation has finished, without waiting."""


class DoneHandle(Handle):
    """A handle for an operation that completed when it was issued."""

    def __init__(self, result: Optional[torch.Tensor]) -> None:
        self._result = result

    def wait(self, timeout_s: Optional[float] = None) -> Optional[torch.Tensor]:
        return self._result

    def is_completed(self) -> bool:
        return True


class Communicator(abc.ABC):
    """Collectives and point-to-point transfers over one group of ranks.

    Create one with :meth:`Communicator.create`. Subclasses register themselves
    under a backend name (``"torch"`` here; ``"shm"`` and ``"ipc"`` later).
    """

    backend: ClassVar[str] = ""
    _registry: ClassVar[dict[str, Callable[..., "Communicator"]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.backend:
            Communicator._registry[cls.backend] = cls

    def __init__(self, name: str, timeout_s: Optional[float] = None) -> None:
        self.name = name
        self._timeout_s = None if timeout_s is None else check_timeout(timeout_s)

    # ------------------------------------------------------------------ factory
    @staticmethod
    def create(backend: str = "torch", group=None, *, name: Optional[str] = None,
               timeout_s: Optional[float] = None) -> "Communicator":
        """Make a communicator of ``backend`` over ``group`` (a ProcessGroup; None is WORLD).

        ``name`` labels the group in error messages (default: the backend's own
        description of the group). ``timeout_s`` overrides ``PLAIT_TIMEOUT_S``; it must be
        a finite number of seconds > 0 (checked before anything is set up).
        """
        if timeout_s is not None:
            check_timeout(timeout_s)
        if isinstance(group, Communicator):
            return group
        try:
            cls = Communicator._registry[backend]
        except KeyError:
            known = ", ".join(sorted(Communicator._registry)) or "none"
            raise ValueError(f"unknown communication backend {backend!r}; available: {known}") from None
        return cls(group, name=name, timeout_s=timeout_s)

    # --------------------------------------------------------------- properties
    @property
    def timeout_s(self) -> float:
        """Seconds any single operation may take before :class:`CommTimeoutError`."""
        return self._timeout_s if self._timeout_s is not None else default_timeout_s()

    @property
    @abc.abstractmethod
    def rank(self) -> int:
        """This process's rank within the group."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Number of ranks in the group."""

    @property
    @abc.abstractmethod
    def global_ranks(self) -> list[int]:
        """Global rank of each group rank, in group order."""

    def describe(self, op: str) -> str:
        """Where an operation runs, for error messages: rank, group and operation."""
        return (f"rank {self.rank} of group {self.name!r} (global ranks {self.global_ranks}), "
                f"operation {op}")

    # --------------------------------------------------------------- operations
    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False):
        """Reduce ``tensor`` across the group in place; returns it (or a Handle)."""

    @abc.abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int = 0, async_op: bool = False):
        """Concatenate every rank's ``tensor`` along ``dim`` in rank order."""

    @abc.abstractmethod
    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0, op: str = "sum",
                       async_op: bool = False):
        """Reduce across ranks and return this rank's block ``dim``-wise."""

    @abc.abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False):
        """Overwrite ``tensor`` on every rank with group rank ``src``'s copy."""

    @abc.abstractmethod
    def send(self, tensor: torch.Tensor, dst: int, async_op: bool = False):
        """Send ``tensor`` to group rank ``dst``."""

    @abc.abstractmethod
    def recv(self, tensor: torch.Tensor, src: int, async_op: bool = False):
        """Receive into ``tensor`` from group rank ``src``."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Return once every rank of the group has entered the barrier."""

    # --------------------------------------------------------------- validation
    def _check_op(self, op: str) -> None:
        if op not in REDUCE_OPS:
            raise ValueError(f"unknown reduce op {op!r}; use one of {REDUCE_OPS}")

    def _check_peer(self, peer: int, what: str) -> None:
        if not 0 <= peer < self.size:
            raise ValueError(f"{what}={peer} is not a rank of group {self.name!r} "
                             f"(size {self.size}); ranks here are group ranks")

    def _check_not_self(self, peer: int, op: str, what: str) -> None:
        """ValueError when a send/recv names this rank as its peer."""
        if peer == self.rank:
            raise ValueError(f"{op}: {what}={peer} is this rank itself; send/recv connect two different ranks")

    @staticmethod
    def _label(op: str, tensor: torch.Tensor) -> str:
        """``op(dtype[shape])``, naming an operation and its tensor in error messages."""
        return f"{op}({str(tensor.dtype).replace('torch.', '')}{list(tensor.shape)})"

    @staticmethod
    def _in_place(tensor: torch.Tensor, run: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """``run(buf)`` on a contiguous tensor holding ``tensor``'s values, its result left in ``tensor``:
        in-place collectives take one flat buffer, so a non-contiguous tensor goes through a copy."""
        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        run(buf)
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    def _tensor_dim(self, tensor: torch.Tensor, dim: int, op: str) -> int:
        """``dim`` as a non-negative index of ``tensor``; a scalar has no dim to gather or scatter.

        Out-of-range dims are rejected as torch.cat would, rather than wrapped onto another dim.
        """
        if tensor.dim() == 0:
            raise ValueError(f"{op} needs a tensor with at least one dim, got a scalar")
        if not -tensor.dim() <= dim < tensor.dim():
            raise ValueError(f"{op}: dim {dim} is out of range for a tensor of shape {list(tensor.shape)} "
                             f"(expected a dim in [{-tensor.dim()}, {tensor.dim() - 1}])")
        return dim % tensor.dim()

    def _check_divisible(self, tensor: torch.Tensor, dim: int, op: str) -> None:
        if tensor.dim() == 0:
            raise ValueError(f"{op} needs a tensor with at least one dim, got a scalar")
        length = tensor.shape[dim]
        if length % self.size:
            raise ValueError(f"{op}: dim {dim} has length {length}, not divisible by the "
                             f"group size {self.size}; pad it to a multiple of {self.size}")


class RanksOfTorch:
    """For backends that keep a torch communicator (``self._torch``) for set-up and fallbacks:
    their group, and so their ranks, are that communicator's. Put it before Communicator."""

    _torch: Communicator

    @property
    def rank(self) -> int:
        return self._torch.rank

    @property
    def size(self) -> int:
        return self._torch.size

    @property
    def global_ranks(self) -> list[int]:
        return self._torch.global_ranks
