"""Which slice of each tensor a TP rank holds, and where tensors are read from.

A :class:`ShardSpec` names a stored tensor (its name in the checkpoint, e.g.
``model.layers.0.self_attn.k_proj.weight``) and the rows this rank keeps along one dim
of it, as an index list. An index list rather than a block, because three layouts are
not blocks:

- **replicated KV heads** (tp does not divide ``num_key_value_heads``): rank r keeps the KV heads
  its query heads use, so several ranks keep the same rows (:class:`plait.heads.HeadLayout`);
- **fused q|k|v** projections (GPT-2's ``c_attn``): a rank keeps its heads' rows of each part;
- **a padded vocabulary**: indices at or past the real size are padding rows (zeros).

Sources (:class:`TensorSource`) read just those rows: :class:`StateDictSource` from
tensors in memory, :class:`SafetensorsSource` from a checkpoint on disk (each contiguous
run of the index is one file read straight into the destination), so a rank never holds
more than its share plus one tensor.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch

from ..config import split_misfit, vocab_rows


def block(size: int, tp: int, rank: int, what: str) -> list[int]:
    """Rank's contiguous block of ``size`` rows; ValueError (the layout rule's own words) when tp does not divide."""
    reason = split_misfit(what, size, tp)
    if reason:
        raise ValueError(reason)
    per = size // tp
    return list(range(rank * per, (rank + 1) * per))


def padded_block(size: int, tp: int, rank: int) -> list[int]:
    """Rank's block of ``size`` rows padded up to a multiple of tp (indices >= size are padding)."""
    per = vocab_rows(size, tp, rank)[0]
    return list(range(rank * per, (rank + 1) * per))


@dataclass(frozen=True)
class ShardSpec:
    """Rows ``index`` along ``dim`` of stored tensor ``name`` (None: the whole tensor).

    ``transpose``: the stored tensor is the transpose of the module's (GPT-2's Conv1D keeps
    ``[in, out]``; plait's layers use ``nn.Linear``'s ``[out, in]``). ``replicated``: some
    rows are also held by other ranks (or twice here), so gradients of them must be summed.
    """

    name: str
    dim: Optional[int] = None
    index: Optional[tuple[int, ...]] = None
    transpose: bool = False
    replicated: bool = False

    def runs(self, size: int) -> list[tuple[int, int]]:
        """Contiguous runs ``[start, stop)`` of the real (non-padding) indices, in index order."""
        index = np.fromiter(self.index or (), dtype=np.int64)     # vectorized: vocabularies have 1e5 rows
        index = index[index < size]
        if not len(index):
            return []
        breaks = (np.flatnonzero(index[1:] != index[:-1] + 1) + 1).tolist()   # where a new run starts
        firsts, lasts = [0, *breaks], [*(b - 1 for b in breaks), len(index) - 1]
        return [(int(index[a]), int(index[b]) + 1) for a, b in zip(firsts, lasts)]


def _narrow_rows(tensor: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    return tensor.narrow(dim, start, stop - start)


def assemble(spec: ShardSpec, size: int, read_run) -> torch.Tensor:
    """The shard of ``spec`` from ``read_run(start, stop)`` (rows of dim ``spec.dim``), with padding zeros."""
    parts = [read_run(start, stop) for start, stop in spec.runs(size)]
    pad = sum(1 for i in spec.index if i >= size)
    if pad:
        like = parts[0] if parts else None
        if like is None:
            raise ValueError(f"{spec.name}: this rank's rows are all padding; use a smaller tp")
        shape = list(like.shape)
        shape[spec.dim] = pad
        parts.append(torch.zeros(shape, dtype=like.dtype))
    return torch.cat(parts, dim=spec.dim) if len(parts) > 1 else parts[0]


class TensorSource(Protocol):
    """Where full tensors live: a model in memory or a checkpoint on disk."""

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, spec: ShardSpec) -> torch.Tensor: ...


class StateDictSource:
    """Tensors in memory, by name (the model being parallelized)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, spec: ShardSpec) -> torch.Tensor:
        full = self.tensors[spec.name].detach()
        if spec.dim is None:
            return full.clone()
        return assemble(spec, full.shape[spec.dim], lambda a, b: _narrow_rows(full, spec.dim, a, b))


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class _Entry:
    """Where one tensor's bytes lie in a safetensors file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int          # of its first byte, from the start of the file
    nbytes: int


def _read_header(path: Path) -> dict[str, _Entry]:
    """The tensors of one safetensors file (format: u64 header length, JSON header, data), checked."""
    if not path.is_file():
        raise ValueError(f"{path}: missing safetensors file named by the checkpoint index")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or not 2 <= length <= size - 8:
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            header = json.loads(f.read(length))
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            entries[name] = _Entry(path, dtype, shape, 8 + length + int(begin), int(end) - int(begin))
            expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if entries[name].nbytes != expected or entries[name].offset + entries[name].nbytes > size:
                raise ValueError(f"tensor {name!r} ({info['dtype']} {list(shape)}) lies past the end of the file "
                                 f"or has the wrong size: the file is truncated or corrupt")
        return entries
    except ValueError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable safetensors file (bad header: {err!r})") from None


class SafetensorsSource:
    """A transformers checkpoint directory: ``model.safetensors`` or ``model.safetensors.index.json`` shards.

    Reads only the requested rows of each tensor: a run of rows along dim 0 is one
    contiguous byte range, read with plain file reads straight into the destination tensor
    (no memory map, so nothing but the shard itself becomes resident); a split along another
    dim reads that one tensor whole and keeps its columns. A rank's peak memory therefore stays
    near its own shard plus one tensor.
    """

    def __init__(self, directory) -> None:
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {str(name): self.directory / str(file) for name, file in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{index}: not a safetensors index (expected a JSON object with 'weight_map': "
                                 f"{err})") from None
        elif single.exists():
            files = None
        else:
            raise ValueError(f"{self.directory}: no model.safetensors or model.safetensors.index.json; plait "
                             f"loads transformers checkpoints saved as safetensors")
        self.entries: dict[str, _Entry] = {}
        for path in sorted({single} if files is None else set(files.values())):
            self.entries.update(_read_header(path))
        missing = sorted(set(files or ()) - set(self.entries))
        if missing:
            raise ValueError(f"{index}: names tensors its files do not hold, e.g. {missing[:3]}")

    def names(self) -> set[str]:
        return set(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def _rows(self, entry: _Entry, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0, read from the file into a new tensor."""
        rest = entry.shape[1:]
        out = torch.empty((stop - start, *rest), dtype=entry.dtype)
        row_bytes = math.prod(rest) * out.element_size() if entry.shape else out.element_size()
        target = memoryview(out.view(torch.uint8).numpy()).cast("B")   # out has >= 1 dim: shape (rows, *rest)
        with open(entry.path, "rb") as f:
            f.seek(entry.offset + start * row_bytes)
            if f.readinto(target) != len(target):
                raise ValueError(f"{entry.path}: tensor bytes end early; the file is truncated")
        return out

    def read(self, spec: ShardSpec) -> torch.Tensor:
        entry = self.entries[spec.name]
        if spec.dim is None or not entry.shape:
            return self._rows(entry, 0, entry.shape[0]) if entry.shape else self._rows(entry, 0, 1).reshape(())
        if spec.dim == 0:
            return assemble(spec, entry.shape[0], lambda a, b: self._rows(entry, a, b))
        full = self._rows(entry, 0, entry.shape[0])
        size = entry.shape[spec.dim]
        return assemble(spec, size, lambda a, b: full if (a, b) == (0, size) else _narrow_rows(full, spec.dim, a, b).clone())
