"""Token files, synthetic sequences, and the batches of a training job.

A token file is a flat array of token ids with no header (the format nanoGPT and
Megatron users already have), read as a ``numpy.memmap``. Its dtype comes from an
explicit ``data_dtype`` or else from the file name (:data:`SUFFIX_DTYPES`):

===========================  ========
suffix                       dtype
===========================  ========
``.bin``, ``.u16``, ``.uint16``  uint16
``.u32``, ``.uint32``        uint32
===========================  ========

Sequences and batches (without shuffling):

- sequence ``i`` is ``tokens[i*seq : i*seq + seq + 1]`` (inputs: its first ``seq``
  tokens, targets: its last ``seq``), so a file of ``n`` tokens holds ``(n - 1) // seq``;
- step ``s`` takes sequences ``[s*B, (s+1)*B)`` of the global batch ``B``, counting on
  past the end of the file from its start again (the k-th sequence of the job is
  sequence ``k mod N``);
- DP rank ``d`` takes rows ``[d*B/dp, (d+1)*B/dp)`` of each global batch.

With ``shuffle`` the k-th sequence of the job is ``perm_e[k mod N]`` where
``e = k // N`` is the epoch and ``perm_e`` a permutation drawn from ``(seed, e)``, so
every epoch sees each sequence once, and the data of step ``s`` depends only on
``s`` (a resumed job reads exactly what the uninterrupted one would have).
Everything is checked when the file is opened, before any training starts.

Synthetic data (``synthetic: true``, no file): each sequence counts upward from a random
start with a random stride of 1 to 3 (mod the vocabulary), and 10% of its tokens are
replaced by random ones, so a model can learn it and the loss falls. The global batch of
step ``s`` is drawn from a generator seeded by ``(seed, s)`` alone and DP rank ``d`` takes
its rows ``[d*B/dp, (d+1)*B/dp)``, so every layout, and a resumed job, sees the same data.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from .job import TrainJob

SUFFIX_DTYPES = {".bin": "uint16", ".u16": "uint16", ".uint16": "uint16", ".u32": "uint32", ".uint32": "uint32"}
DATA_DTYPES = ("uint16", "uint32")
_SCAN_CHUNK = 1 << 24   # tokens checked against the vocabulary at a time


def token_dtype(path: Union[str, Path], data_dtype: Optional[str] = None) -> np.dtype:
    """The dtype of token file ``path``: ``data_dtype`` when given, else by its suffix (module doc)."""
    if data_dtype is not None:
        if data_dtype not in DATA_DTYPES:
            raise ValueError(f"data_dtype must be one of {DATA_DTYPES}, got {data_dtype!r}")
        return np.dtype(data_dtype)
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_DTYPES:
        raise ValueError(f"{path}: cannot tell the token dtype from the suffix {suffix or '(none)'!r}; name the "
                         f"file {', '.join(SUFFIX_DTYPES)} or pass --data-dtype {'|'.join(DATA_DTYPES)}")
    return np.dtype(SUFFIX_DTYPES[suffix])


class TokenFile:
    """A checked, memory-mapped token file cut into sequences of ``seq + 1`` tokens (module doc)."""

    def __init__(self, path: Union[str, Path], seq: int, vocab_size: int, data_dtype: Optional[str] = None) -> None:
        self.path = Path(path)
        self.seq = seq
        dtype = token_dtype(path, data_dtype)
        if not self.path.is_file():
            raise ValueError(f"{path}: token file not found")
        size = self.path.stat().st_size
        if size == 0:
            raise ValueError(f"{path}: the token file is empty")
        if size % dtype.itemsize:
            raise ValueError(f"{path}: {size} bytes is not a whole number of {dtype.name} tokens "
                             f"({dtype.itemsize} bytes each); the file is truncated or of another dtype "
                             f"(--data-dtype)")
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r")
        self.first, self.count = 0, (len(self.tokens) - 1) // seq
        if self.count < 1:
            raise ValueError(f"{path}: {len(self.tokens)} tokens are fewer than one sequence of seq + 1 = "
                             f"{seq + 1}; use more data or a shorter --seq")
        self._check_vocab(vocab_size)

    def part(self, first: int, count: int) -> "TokenFile":
        """The same file restricted to its sequences ``[first, first + count)`` (for held-out splits)."""
        if not (0 <= first and 1 <= count and first + count <= self.count):
            raise ValueError(f"{self.path}: sequences [{first}, {first + count}) do not lie in the file's "
                             f"{self.count} sequences")
        out = copy.copy(self)
        out.first, out.count = self.first + first, count
        return out

    def _check_vocab(self, vocab_size: int) -> None:
        for start in range(0, len(self.tokens), _SCAN_CHUNK):
            chunk = self.tokens[start:start + _SCAN_CHUNK]
            high = int(chunk.max())
            if high >= vocab_size:
                where = start + int(np.argmax(chunk >= vocab_size))
                raise ValueError(f"{self.path}: token id {int(self.tokens[where])} at position {where} is not "
                                 f"below the model's vocabulary size {vocab_size}; was the file made with "
                                 f"another tokenizer, or is --data-dtype wrong?")

    def __len__(self) -> int:
        return self.count

    def sequences(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets ``[len(indices), seq]`` (int64) of the given sequence numbers."""
        rows = np.stack([self.tokens[(self.first + i) * self.seq:(self.first + i) * self.seq + self.seq + 1]
                         for i in indices.tolist()]).astype(np.int64)
        batch = torch.from_numpy(rows)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(count)


@dataclass(frozen=True)
class Batches:
    """Which sequences of a :class:`TokenFile` each step and DP rank reads (module doc)."""

    data: TokenFile
    global_batch: int
    dp: int
    shuffle: bool = False
    seed: int = 0

    def indices(self, step: int) -> np.ndarray:
        """The sequence numbers of step ``step``'s whole global batch."""
        count = len(self.data)
        k = np.arange(step * self.global_batch, (step + 1) * self.global_batch, dtype=np.int64)
        if not self.shuffle:
            return k % count
        out = np.empty_like(k)
        for epoch in np.unique(k // count).tolist():
            where = k // count == epoch
            out[where] = _permutation(self.seed, epoch, count)[k[where] % count]
        return out

    def batch(self, step: int, dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets ``[global_batch / dp, seq]`` of DP rank ``dp_rank`` at step ``step``."""
        rows = self.global_batch // self.dp
        return self.data.sequences(self.indices(step)[dp_rank * rows:(dp_rank + 1) * rows])


@dataclass(frozen=True)
class SyntheticBatches:
    """The synthetic sequences of a job (module doc), with the interface of :class:`Batches`."""

    vocab_size: int
    seq: int
    global_batch: int
    dp: int
    seed: int = 0

    def whole(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets ``[global_batch, seq]`` of step ``step``'s whole global batch."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + step)
        start = torch.randint(0, self.vocab_size, (self.global_batch, 1), generator=gen)
        stride = torch.randint(1, 4, (self.global_batch, 1), generator=gen)
        tokens = (start + stride * torch.arange(self.seq + 1)) % self.vocab_size
        noise = torch.rand(self.global_batch, self.seq + 1, generator=gen) < 0.1
        tokens = torch.where(noise, torch.randint(0, self.vocab_size, tokens.shape, generator=gen), tokens)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def batch(self, step: int, dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets ``[global_batch / dp, seq]`` of DP rank ``dp_rank`` at step ``step``."""
        rows = self.global_batch // self.dp
        return tuple(t[dp_rank * rows:(dp_rank + 1) * rows].contiguous() for t in self.whole(step))


def job_batches(job: TrainJob, vocab_size: int) -> tuple[Union[Batches, SyntheticBatches], Optional[Batches]]:
    """The training and (if any) evaluation batches of a :class:`~plait.train.job.TrainJob` whose model
    has ``vocab_size`` ids; token files are opened and checked here, before any training starts."""
    held: Optional[TokenFile] = None
    if job.synthetic:
        train: Union[Batches, SyntheticBatches] = SyntheticBatches(vocab_size, job.seq, job.global_batch, job.dp,
                                                                   job.seed)
    elif job.eval_fraction:
        data, held = split_held_out(job.data, job.seq, vocab_size, job.eval_fraction, job.data_dtype)
        train = Batches(data, job.global_batch, job.dp, job.shuffle, job.seed)
    else:
        train = Batches(TokenFile(job.data, job.seq, vocab_size, job.data_dtype), job.global_batch, job.dp,
                        job.shuffle, job.seed)
    if job.eval_data:
        held = TokenFile(job.eval_data, job.seq, vocab_size, job.data_dtype)
    return train, (Batches(held, job.global_batch, job.dp) if held is not None else None)


def split_held_out(path, seq: int, vocab_size: int, fraction: float, data_dtype: Optional[str] = None
                   ) -> tuple[TokenFile, TokenFile]:
    """The file's first sequences for training and its last ``ceil(fraction * N)`` for evaluation."""
    whole = TokenFile(path, seq, vocab_size, data_dtype)
    held = int(np.ceil(fraction * len(whole)))
    if not 1 <= held < len(whole):
        raise ValueError(f"{path}: holding out {fraction:g} of its {len(whole)} sequences leaves no training or "
                         f"no evaluation data; use another --eval-fraction or an --eval-data file")
    return whole.part(0, len(whole) - held), whole.part(len(whole) - held, held)
