"""GEMMs that talk to each other through per-chunk flags: the building blocks of ``overlap="fused"``.

The output (producer) or input (consumer) rows are cut into chunks of
``rows_per_chunk``. A :class:`ChunkSignals` holds one int32 flag per chunk.

- :func:`producer_linear` computes ``x @ W.T`` (+ bias, activation) and, as
  the last tile of a chunk is stored, sets ``flags[chunk] = epoch`` with
  release semantics, so whoever reads the flag with acquire sees the rows.
- :func:`consumer_linear` computes ``a @ W.T`` but, before a tile loads rows of
  ``a``, spins (acquire) until ``flags[chunk] >= epoch`` for each chunk it
  reads. The spin is bounded; past the bound it records the chunk in
  ``error`` and moves on, and :meth:`ChunkSignals.check` raises.

Flags only grow (each round uses a new epoch), so they never need resetting
between rounds; the per-chunk tile counters are zeroed on the stream before
each producer launch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from ..errors import default_timeout_s
from .config import ACT_CODES
from .gemm import launch_gemm
from .linear import check_linear_args, flatten_rows, rows_view

SPINS_PER_SECOND = 1_000_000  # an acquire poll of global memory takes about a microsecond on a GPU
_INT32_MAX = 2**31 - 1


class SignalTimeoutError(RuntimeError):
    """A consumer GEMM waited past its bound for a chunk that was never published."""


@dataclass
class ChunkSignals:
    """Per-chunk ready flags, tile counters and an error word on one device."""

    flags: torch.Tensor
    counters: torch.Tensor
    error: torch.Tensor
    rows_per_chunk: int
    epoch: int = 0

    @classmethod
    def create(cls, rows: int, num_chunks: int, device) -> "ChunkSignals":
        """Signals for ``rows`` rows cut into ``num_chunks`` near-equal chunks."""
        if rows < 1 or num_chunks < 1:
            raise ValueError(f"rows and num_chunks must be positive, got {rows} and {num_chunks}")
        rows_per_chunk = triton.cdiv(rows, num_chunks)
        chunks = triton.cdiv(rows, rows_per_chunk)
        zeros = lambda n: torch.zeros(n, dtype=torch.int32, device=device)
        return cls(flags=zeros(chunks), counters=zeros(chunks), error=zeros(1), rows_per_chunk=rows_per_chunk)

    @property
    def num_chunks(self) -> int:
        return self.flags.numel()

    def next_epoch(self) -> int:
        """Start a new round: the value the producer will publish and the consumer await."""
        self.epoch += 1
        if self.epoch > _INT32_MAX:
            raise OverflowError("signal epochs exhausted; create new ChunkSignals")
        return self.epoch

    def check(self) -> None:
        """Raise :class:`SignalTimeoutError` if a consumer timed out (synchronizes with the device)."""
        code = int(self.error.item())
        if code:
            raise SignalTimeoutError(f"consumer GEMM gave up waiting for chunk {code - 1} of {self.num_chunks} "
                                     f"(epoch {self.epoch}, flags {self.flags.tolist()}): its producer never "
                                     f"published it")


def _check_rows(signals: ChunkSignals, rows: int, what: str) -> None:
    if triton.cdiv(rows, signals.rows_per_chunk) != signals.num_chunks:
        raise ValueError(f"{what} has {rows} rows, but the signals were made for {signals.num_chunks} chunks "
                         f"of {signals.rows_per_chunk} rows")


def _check_programs(programs: Optional[int]) -> None:
    if programs is not None and programs < 1:
        raise ValueError(f"programs caps the persistent grid and must be at least 1, got {programs}")


def producer_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    activation: Optional[str] = None, *, signals: ChunkSignals, epoch: Optional[int] = None,
                    out: Optional[torch.Tensor] = None, programs: Optional[int] = None) -> torch.Tensor:
    """``activation(x @ weight.T + bias)`` publishing ``signals.flags[chunk] = epoch`` per finished row chunk.

    ``epoch`` defaults to ``signals.next_epoch()``. ``programs`` caps the
    persistent grid, leaving SMs to a kernel that consumes the chunks
    meanwhile. No autograd: this is a forward building block for overlapped
    communication.
    """
    _check_programs(programs)
    n = check_linear_args(x, weight, bias, activation, None, out)
    x2 = flatten_rows(x)
    _check_rows(signals, x2.shape[0], "x")
    y = out if out is not None else torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    y2 = rows_view(y)
    if y2 is None:
        raise ValueError(f"out (strides {list(y.stride())}) must flatten to [rows, N] without a copy: the flags "
                         f"announce rows written in place")
    epoch = signals.next_epoch() if epoch is None else epoch
    signals.counters.zero_()
    launch_gemm(x2, weight.t(), y2, act=ACT_CODES[activation], swiglu=activation == "swiglu", bias=bias,
                publish=(signals.counters, signals.flags, epoch, signals.rows_per_chunk), programs=programs)
    return y


def consumer_linear(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    activation: Optional[str] = None, *, signals: ChunkSignals, epoch: Optional[int] = None,
                    timeout_s: Optional[float] = None, programs: Optional[int] = None) -> torch.Tensor:
    """``activation(a @ weight.T + bias)``, each tile first awaiting the flags of the ``a`` rows it reads.

    ``epoch`` defaults to ``signals.epoch`` (the producer's latest round).
    ``timeout_s`` (default ``PLAIT_TIMEOUT_S``) bounds each wait, counted in
    polls of about a microsecond. ``programs`` caps the persistent grid so
    the producer keeps SMs to run on. Call ``signals.check()`` to surface a timeout.
    """
    n = check_linear_args(a, weight, bias, activation, None, None)
    _check_programs(programs)
    a2 = flatten_rows(a)
    _check_rows(signals, a2.shape[0], "a")
    epoch = signals.epoch if epoch is None else epoch
    seconds = default_timeout_s() if timeout_s is None else timeout_s
    max_spins = max(1, min(_INT32_MAX, int(seconds * SPINS_PER_SECOND)))
    y = torch.empty(*a.shape[:-1], n, dtype=a.dtype, device=a.device)
    signals.error.zero_()
    launch_gemm(a2, weight.t(), y.view(a2.shape[0], n), act=ACT_CODES[activation], swiglu=activation == "swiglu",
                bias=bias,
                await_=(signals.flags, signals.error, epoch, signals.rows_per_chunk, max_spins), programs=programs)
    return y
