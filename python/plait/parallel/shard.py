"""Which slice of each tensor a TP rank holds, and where tensors are read from.

A :class:`ShardSpec` names a stored tensor (its name in the checkpoint, e.g.
``model.layers.0.self_attn.k_proj.weight``) and the rows this rank keeps along one dim
of it, as an index list. An index list rather than a block, because three layouts are
not blocks:

- **replicated KV heads** (``tp > num_key_value_heads``): rank r keeps the KV heads its
  query heads use, so several ranks keep the same rows (:class:`HeadLayout`);
- **fused q|k|v** projections (GPT-2's ``c_attn``): a rank keeps its heads' rows of each part;
- **a padded vocabulary**: indices at or past the real size are padding rows (zeros).

Sources (:class:`TensorSource`) read just those rows: :class:`StateDictSource` from
tensors in memory, :class:`SafetensorsSource` from a checkpoint on disk through
``safe_open(...).get_slice`` (each contiguous run of the index is one read), so a rank
never holds more than its share plus one tensor's worth of a run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence

import torch


@dataclass(frozen=True)
class HeadLayout:
    """Attention heads of one TP rank: its query heads and the KV heads they use.

    Query heads are split in contiguous blocks (tp must divide them). KV heads are split
    likewise when tp divides them; otherwise each rank keeps the KV heads its query heads
    read, replicated across ranks, and when its query heads do not group evenly over them
    (e.g. 12 heads, 3 KV heads, tp=4) it keeps one KV head per query head.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    tp: int
    rank: int

    def __post_init__(self) -> None:
        if self.num_heads % self.tp:
            raise ValueError(f"num_attention_heads={self.num_heads} is not divisible by tp={self.tp}; each rank "
                             f"holds whole query heads, so use a tp that divides {self.num_heads}")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_key_value_heads={self.num_kv_heads} must divide num_attention_heads="
                             f"{self.num_heads}")

    @property
    def q_heads(self) -> range:
        per = self.num_heads // self.tp
        return range(self.rank * per, (self.rank + 1) * per)

    @property
    def kv_heads(self) -> list[int]:
        group = self.num_heads // self.num_kv_heads
        used = [q // group for q in self.q_heads]
        distinct = sorted(set(used))
        share = len(used) // len(distinct)
        if len(used) % len(distinct) == 0 and used == [k for k in distinct for _ in range(share)]:
            return distinct
        return used   # uneven grouping: one KV head per query head

    @property
    def replicated_kv(self) -> bool:
        """True when some KV head is held by more than one rank (or twice by one)."""
        return self.num_kv_heads % self.tp != 0

    @property
    def kv_groups(self) -> int:
        """Query heads per local KV head (``num_key_value_groups`` on this rank)."""
        return len(self.q_heads) // len(self.kv_heads)

    def rows(self, heads: Sequence[int], offset: int = 0) -> list[int]:
        return [offset + h * self.head_dim + i for h in heads for i in range(self.head_dim)]


def block(size: int, tp: int, rank: int, what: str) -> list[int]:
    """Rank's contiguous block of ``size`` rows; ValueError when tp does not divide."""
    if size % tp:
        raise ValueError(f"{what}={size} is not divisible by tp={tp}; choose a tp that divides it")
    per = size // tp
    return list(range(rank * per, (rank + 1) * per))


def padded_block(size: int, tp: int, rank: int) -> list[int]:
    """Rank's block of ``size`` rows padded up to a multiple of tp (indices >= size are padding)."""
    per = -(-size // tp)
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
        out: list[tuple[int, int]] = []
        for i in self.index or ():
            if i >= size:
                continue
            if out and out[-1][1] == i:
                out[-1] = (out[-1][0], i + 1)
            else:
                out.append((i, i + 1))
        return out


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


class SafetensorsSource:
    """A transformers checkpoint directory: ``model.safetensors`` or ``model.safetensors.index.json`` shards.

    Reads only the requested rows of each tensor (``get_slice``). Each read opens the file
    (a memory map) and closes it again, so the pages a read touched leave this process's
    resident memory with it: a rank's peak stays near its own shard plus one tensor.
    """

    def __init__(self, directory) -> None:
        from safetensors import safe_open

        self._safe_open = safe_open
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self.files = {str(name): self.directory / str(file) for name, file in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{index}: not a safetensors index (expected a JSON object with 'weight_map': "
                                 f"{err})") from None
        elif single.exists():
            self.files = None
        else:
            raise ValueError(f"{self.directory}: no model.safetensors or model.safetensors.index.json; plait "
                             f"loads transformers checkpoints saved as safetensors")
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in sorted({single} if self.files is None else set(self.files.values())):
            with self._open(path) as handle:
                for name in handle.keys():
                    self._shapes[name] = tuple(handle.get_slice(name).get_shape())
        if self.files is None:
            self.files = {name: single for name in self._shapes}
        missing = sorted(set(self.files) - set(self._shapes))
        if missing:
            raise ValueError(f"{index}: names tensors its files do not hold, e.g. {missing[:3]}")

    def _open(self, path: Path):
        if not path.exists():
            raise ValueError(f"{path}: missing safetensors file named by the checkpoint index")
        try:
            return self._safe_open(str(path), framework="pt", device="cpu")
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, spec: ShardSpec) -> torch.Tensor:
        path = self.files[spec.name]
        with self._open(path) as handle:
            try:
                if spec.dim is None:
                    return handle.get_tensor(spec.name).clone()
                sliced = handle.get_slice(spec.name)
                size = sliced.get_shape()[spec.dim]
                lead = (slice(None),) * spec.dim
                return assemble(spec, size, lambda a, b: sliced[(*lead, slice(a, b))].clone())
            except ValueError:
                raise
            except Exception as err:
                raise ValueError(f"{path}: cannot read tensor {spec.name!r} ({err}); the file is truncated or "
                                 f"corrupt") from None

