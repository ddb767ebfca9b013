"""Point-to-point transport for the pipeline engine, over a :class:`~plait.comm.Communicator`.

Tensors travel with the communicator's async ``send``/``recv`` (torch ``isend``/``irecv``
on the ``torch`` backend), so every wait is bounded by ``PLAIT_TIMEOUT_S`` and a dead
peer becomes a :class:`~plait.errors.CommTimeoutError` that also names the pipeline
action. Ranks are the communicator's group ranks (= pipeline ranks on ``mesh.pp_comm``).

Shapes and dtypes: a receiver must size its buffer before the data arrives. Each step
begins with a small *signature* (the step kind and each microbatch's input shape and
dtype) passed rank to rank from the first stage. For a signature seen before, every
rank already knows the shape of everything it will receive (:class:`MetaCache`), so
receives are posted at once and nothing else travels. For a new one (the first step,
or a new sequence length) each activation is preceded by a small header with its shape
and dtype, which the receiver reads and remembers.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from ..comm import Communicator, Handle
from ..errors import CommError, CommTimeoutError

MAX_DIMS = 8
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
HEADER_LEN = 2 + MAX_DIMS


@dataclass(frozen=True)
class Meta:
    """Shape and dtype of one tensor that crosses ranks."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "Meta":
        if tensor.dim() > MAX_DIMS:
            raise ValueError(f"a tensor sent between pipeline stages has {tensor.dim()} dims, at most {MAX_DIMS} "
                             f"are supported; reshape it inside the stages")
        if tensor.dtype not in DTYPES:
            raise ValueError(f"dtype {tensor.dtype} cannot be sent between pipeline stages; use one of {DTYPES}")
        return cls(tuple(tensor.shape), tensor.dtype)

    def encode(self) -> list[int]:
        return [DTYPES.index(self.dtype), len(self.shape), *self.shape, *([0] * (MAX_DIMS - len(self.shape)))]

    @classmethod
    def decode(cls, values: list[int]) -> "Meta":
        code, ndim = values[0], values[1]
        if not (0 <= code < len(DTYPES) and 0 <= ndim <= MAX_DIMS):
            raise CommError(f"received a corrupt tensor header {values}: the ranks disagree on the schedule")
        return cls(tuple(values[2:2 + ndim]), DTYPES[code])


class MetaCache:
    """Signature -> {key: Meta} for the last ``capacity`` signatures, least recently used dropped.

    Every rank sees the same signatures in the same order, so every rank's cache holds
    the same signatures and all agree on whether a step needs headers.
    """

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple, dict] = OrderedDict()

    def get(self, signature: tuple) -> Optional[dict]:
        found = self._entries.get(signature)
        if found is not None:
            self._entries.move_to_end(signature)
        return found

    def put(self, signature: tuple, metas: dict) -> None:
        self._entries[signature] = metas
        self._entries.move_to_end(signature)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


@dataclass
class PendingRecv:
    """A posted receive: its handle, the buffer it fills and what it is, for errors."""

    handle: Handle
    buffer: torch.Tensor
    what: str


class Transport:
    """Sends and receives of one pipeline rank; keeps sends alive until they complete."""

    def __init__(self, comm: Communicator, device: torch.device) -> None:
        self.comm = comm
        self.device = device
        self._sends: list[tuple[Handle, torch.Tensor, str]] = []

    @property
    def rank(self) -> int:
        return self.comm.rank

    def _wait(self, handle: Handle, what: str) -> Optional[torch.Tensor]:
        try:
            return handle.wait()
        except CommTimeoutError as exc:
            raise CommTimeoutError(f"pipeline rank {self.rank} waiting for {what}: {exc}") from exc
        except CommError as exc:
            raise CommError(f"pipeline rank {self.rank} waiting for {what}: {exc}") from exc

    # ------------------------------------------------------------ tensors
    def post_recv(self, meta: Meta, src: int, what: str) -> PendingRecv:
        buffer = torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
        return PendingRecv(self.comm.recv(buffer, src, async_op=True), buffer, what)

    def wait_recv(self, pending: PendingRecv) -> torch.Tensor:
        self._wait(pending.handle, pending.what)
        return pending.buffer

    def send(self, tensor: torch.Tensor, dst: int, what: str) -> None:
        self._sends.append((self.comm.send(tensor, dst, async_op=True), tensor, what))

    def prune(self) -> None:
        """Forget sends that have completed, freeing their tensors."""
        keep = []
        for handle, tensor, what in self._sends:
            if handle.is_completed():
                self._wait(handle, what)  # returns at once; raises if the send failed
            else:
                keep.append((handle, tensor, what))
        self._sends = keep

    def drain(self) -> None:
        """Wait for every send still in flight."""
        sends, self._sends = self._sends, []
        for handle, _, what in sends:
            self._wait(handle, what)

    # ------------------------------------------------------------ small integer messages
    def send_ints(self, values: list[int], dst: int, what: str) -> None:
        self.send(torch.tensor(values, dtype=torch.int64, device=self.device), dst, what)

    def recv_ints(self, length: int, src: int, what: str) -> list[int]:
        pending = self.post_recv(Meta((length,), torch.int64), src, what)
        return self.wait_recv(pending).tolist()

    def send_meta(self, meta: Meta, dst: int, what: str) -> None:
        self.send_ints(meta.encode(), dst, f"header of {what}")

    def recv_meta(self, src: int, what: str) -> Meta:
        return Meta.decode(self.recv_ints(HEADER_LEN, src, f"header of {what}"))


def encode_signature(mode: int, metas: list[Meta]) -> list[int]:
    """The step signature: step kind, then each microbatch input's header."""
    return [mode, len(metas)] + [v for meta in metas for v in meta.encode()]


def signature_length(num_microbatches: int) -> int:
    return 2 + num_microbatches * HEADER_LEN


def decode_signature(values: list[int]) -> tuple[int, list[Meta]]:
    mode, count = values[0], values[1]
    return mode, [Meta.decode(values[2 + i * HEADER_LEN: 2 + (i + 1) * HEADER_LEN]) for i in range(count)]
