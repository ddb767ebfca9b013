"""Token files and the batches of a training job.

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
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

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


def split_held_out(path, seq: int, vocab_size: int, fraction: float, data_dtype: Optional[str] = None
                   ) -> tuple[TokenFile, TokenFile]:
    """The file's first sequences for training and its last ``ceil(fraction * N)`` for evaluation."""
    whole = TokenFile(path, seq, vocab_size, data_dtype)
    held = int(np.ceil(fraction * len(whole)))
    if not 1 <= held < len(whole):
        raise ValueError(f"{path}: holding out {fraction:g} of its {len(whole)} sequences leaves no training or "
                         f"no evaluation data; use another --eval-fraction or an --eval-data file")
    return whole.part(0, len(whole) - held), whole.part(len(whole) - held, held)
