"""ParallelConfig: the one owner of plait's layout rules.

Every place that takes a (dp, pp, tp) layout (``init_mesh``, ``PipelineEngine``'s callers,
``TrainJob``, ``parallelize``, ``plait plan``'s layouts, ``plait train``) builds or receives
a :class:`ParallelConfig`, so a rule is written, and its error message worded, once:

==================  ==========================================================================
field               rule
==================  ==========================================================================
dp, pp, tp          positive ints; ``dp * pp * tp`` processes
num_virtual         positive int; > 1 only with the "interleaved" or "zb1p" schedule
schedule            one of :data:`SCHEDULES` (aliases ``zb-h1``/``zbh1`` mean ``zb1p``);
                    "interleaved" needs ``num_virtual >= 2``
sequence_parallel   bool; needs ``tp >= 2`` to mean anything (allowed at tp=1: a no-op)
zero                0 (off) or 1 (optimizer state sharded over DP)
overlap             one of :data:`OVERLAP_MODES`
tp_across_hosts     bool; False keeps every TP group inside one host (:meth:`check_hosts`)
==================  ==========================================================================

Whether a model fits a layout has one verdict, :meth:`ParallelConfig.misfit` (the reason, or
None) and :meth:`ParallelConfig.check_model` (the same reason as a ValueError), over the
model's :class:`ModelShape`. The planner filters its layouts with it and ``parallelize``,
``plait train``, ``plait generate`` and ``plait serve`` refuse with it, so a layout the planner
offers is one the runtime runs, and the other way round. The rules are exactly what the runtime
supports:

==================  ==========================================================================
dimension           rule
==================  ==========================================================================
query heads         divisible by tp (each TP rank holds whole query heads)
KV heads            any count that divides the query heads: split when tp divides them,
                    otherwise replicated (:mod:`plait.heads` says which rank holds which)
FFN hidden          divisible by tp
vocabulary          padded to a multiple of tp, so no divisibility; but the last TP rank
                    must hold at least one real row (:func:`vocab_rows`)
layers              at least ``pp * num_virtual`` (stages may be uneven)
sequence length     divisible by tp under sequence parallelism
==================  ==========================================================================

Fused projections (GPT-2's ``c_attn`` = q|k|v, a fused gate|up) are split part by part, so
their rules are those of the parts above (heads, FFN), never of the fused width.

The rule that a TP group stays inside one host is :meth:`check_hosts` (with each rank's host).
Pure Python, no torch: ``plait plan`` imports it without paying for torch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Sequence

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb1p")
SCHEDULE_ALIASES = {"zb-h1": "zb1p", "zbh1": "zb1p"}
VIRTUAL_SCHEDULES = ("interleaved", "zb1p")   # the schedules that run several stages per rank
ZERO_STAGES = (0, 1)
OVERLAP_MODES = ("auto", "none", "chunked", "fused")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _divisors(n: int) -> list[int]:
    """The divisors of n >= 1, ascending (for error messages)."""
    low = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*low, *(n // d for d in low)})


def split_misfit(what: str, size: Optional[int], tp: int) -> Optional[str]:
    """Why ``size`` rows named ``what`` cannot be split evenly over ``tp`` ranks, or None (also when unknown)."""
    if size is None or size % tp == 0:
        return None
    choices = ", ".join(map(str, _divisors(size)[:12]))
    return f"{what}={size} is not divisible by tp={tp}; use a tp that divides it ({choices})"


def head_misfit(num_heads: int, num_kv_heads: Optional[int], tp: int) -> Optional[str]:
    """Why attention with these heads cannot be split over ``tp`` ranks, or None.

    Each rank holds whole query heads; KV heads are split when tp divides them and replicated
    otherwise, so any KV count that divides the query heads works (e.g. 12 heads, 3 KV heads, tp=4).
    """
    kv = num_heads if num_kv_heads is None else num_kv_heads
    if kv < 1 or num_heads % kv:
        return (f"num_kv_heads={kv} must divide num_heads={num_heads} (each KV head serves a whole group of "
                f"query heads); the model's config is inconsistent")
    if num_heads % tp:
        choices = ", ".join(map(str, _divisors(num_heads)[:12]))
        return (f"num_heads={num_heads} is not divisible by tp={tp}; each TP rank holds whole query heads, so use "
                f"a tp that divides {num_heads} ({choices})")
    return None


def vocab_rows(vocab_size: int, tp: int, rank: int) -> tuple[int, int, int]:
    """(rows per rank, padded vocabulary, real rows on ``rank``) for a vocabulary padded to a multiple of tp."""
    per = -(-vocab_size // tp)
    return per, per * tp, max(0, min(per, vocab_size - rank * per))


def vocab_misfit(vocab_size: Optional[int], tp: int) -> Optional[str]:
    """Why a vocabulary cannot be split over ``tp`` ranks (its last rank would hold only padding), or None."""
    if vocab_size is None or vocab_rows(vocab_size, tp, tp - 1)[2] > 0:
        return None
    per, padded, _ = vocab_rows(vocab_size, tp, tp - 1)
    best = max(t for t in range(1, tp) if vocab_rows(vocab_size, t, t - 1)[2] > 0)
    return (f"vocab_size={vocab_size} is too small for tp={tp}: padded to {padded} rows, {per} per rank, the last "
            f"rank would hold only padding; use a smaller tp (e.g. tp={best})")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder that decide which layouts it fits (see :meth:`ParallelConfig.misfit`).

    ``num_kv_heads`` None means no grouped-query attention (as many as ``num_heads``); the other
    dimensions left None are unknown and not checked. ``seq_len`` is the training sequence
    length (only sequence parallelism constrains it).
    """

    num_layers: int
    num_heads: int
    num_kv_heads: Optional[int] = None
    ffn_hidden: Optional[int] = None
    vocab_size: Optional[int] = None
    seq_len: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "num_kv_heads", "ffn_hidden", "vocab_size", "seq_len"):
            value = getattr(self, name)
            if value is not None or name in ("num_layers", "num_heads"):
                _positive_int(f"ModelShape.{name}", value)
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)


def ranks_text(ranks: Sequence[int]) -> str:
    """'4-7' for consecutive ranks, else '0, 2'."""
    ranks = list(ranks)
    if len(ranks) > 1 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ", ".join(map(str, ranks))


def canonical_schedule(name: Any) -> str:
    """The schedule's canonical name, or a ValueError listing the valid ones."""
    if not isinstance(name, str) or SCHEDULE_ALIASES.get(name.lower(), name.lower()) not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; use one of {SCHEDULES}")
    return SCHEDULE_ALIASES.get(name.lower(), name.lower())


@dataclass(frozen=True)
class ParallelConfig:
    """How one job is laid over ``dp * pp * tp`` ranks; validated on construction (see module doc)."""

    dp: int = 1
    pp: int = 1
    tp: int = 1
    num_virtual: int = 1
    schedule: str = "1f1b"
    sequence_parallel: bool = False
    zero: int = 0
    overlap: str = "auto"
    tp_across_hosts: bool = False

    def __post_init__(self) -> None:
        for name in ("dp", "pp", "tp", "num_virtual"):
            _positive_int(name, getattr(self, name))
        object.__setattr__(self, "schedule", canonical_schedule(self.schedule))
        if self.schedule == "interleaved" and self.num_virtual < 2:
            raise ValueError(f"the interleaved schedule needs num_virtual >= 2 (--vpp), got {self.num_virtual}")
        if self.num_virtual > 1 and self.schedule not in VIRTUAL_SCHEDULES:
            raise ValueError(f"virtual stages (num_virtual={self.num_virtual}) need one of the schedules "
                             f"{VIRTUAL_SCHEDULES}; {self.schedule!r} runs one stage per rank")
        if not isinstance(self.sequence_parallel, bool):
            raise ValueError(f"sequence_parallel must be True or False, got {self.sequence_parallel!r}")
        if isinstance(self.zero, bool) or self.zero not in ZERO_STAGES:
            raise ValueError(f"zero must be one of {ZERO_STAGES} (0: off, 1: optimizer state sharded over DP), "
                             f"got {self.zero!r}; ZeRO stages 2 and 3 are not implemented")
        if self.overlap not in OVERLAP_MODES:
            raise ValueError(f"unknown overlap {self.overlap!r}; use one of {OVERLAP_MODES}")
        if not isinstance(self.tp_across_hosts, bool):
            raise ValueError(f"tp_across_hosts must be True or False, got {self.tp_across_hosts!r}")

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def num_chunks(self) -> int:
        """Pipeline chunks the model is cut into: ``pp * num_virtual``."""
        return self.pp * self.num_virtual

    def misfit(self, shape: ModelShape) -> Optional[str]:
        """Why a model of ``shape`` cannot run on this layout (the first rule it breaks, with the fix), or
        None when it can: the one verdict on model fit (see the module docstring). Never raises."""
        reason = (head_misfit(shape.num_heads, shape.num_kv_heads, self.tp)
                  or split_misfit("ffn_hidden", shape.ffn_hidden, self.tp)
                  or vocab_misfit(shape.vocab_size, self.tp))
        if reason:
            return reason
        if self.sequence_parallel and shape.seq_len is not None and shape.seq_len % self.tp:
            return (f"sequence_parallel needs the sequence length {shape.seq_len} divisible by tp={self.tp}; "
                    f"change the sequence length or turn sequence parallelism off")
        if shape.num_layers < self.num_chunks:
            return (f"num_layers={shape.num_layers} is fewer than pp x virtual stages = {self.pp} x "
                    f"{self.num_virtual}; use fewer stages or more layers")
        return None

    def check_model(self, shape: ModelShape) -> None:
        """Raise ValueError with :meth:`misfit`'s reason when a model of ``shape`` cannot run on this layout."""
        if not isinstance(shape, ModelShape):
            raise ValueError(f"check_model takes a plait.config.ModelShape, got {type(shape).__name__}")
        reason = self.misfit(shape)
        if reason:
            raise ValueError(reason)

    def check_hosts(self, hosts: Sequence[str]) -> None:
        """Raise ValueError, naming the hosts, if a TP group would span hosts (unless ``tp_across_hosts``).

        ``hosts[r]`` names the host of global rank ``r``. Ranks are laid out TP innermost
        (:mod:`plait.mesh`), so TP group ``g`` is ranks ``g*tp .. g*tp+tp-1``; launchers number the
        ranks of one host consecutively (torchrun and ``plait train --nnodes`` do), so a ``tp``
        that divides the ranks per host keeps every TP group inside a host. Tensor parallelism
        exchanges activations in every layer: across hosts that runs at network speed.
        """
        if len(hosts) != self.world_size:
            raise ValueError(f"{len(hosts)} hosts given for {self.world_size} ranks")
        if self.tp_across_hosts or self.tp == 1:
            return
        for first in range(0, self.world_size, self.tp):
            group = list(range(first, first + self.tp))
            names = sorted({hosts[r] for r in group}, key=lambda h: hosts.index(h))
            if len(names) == 1:
                continue
            where = "; ".join(f"{h}: ranks {ranks_text([r for r in group if hosts[r] == h])}" for h in names)
            per_host = min(sum(1 for h in hosts if h == name) for name in set(hosts))
            raise ValueError(f"tp={self.tp} puts TP group ranks {ranks_text(group)} on {len(names)} hosts ({where}); "
                             f"a TP group exchanges activations in every layer and must stay inside one host: use "
                             f"a tp that divides the ranks per host ({per_host}) and put dp or pp across hosts, "
                             f"give each host's ranks consecutive numbers, or allow it with tp_across_hosts "
                             f"(--tp-across-hosts)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ParallelConfig":
        """Build from a mapping; unknown keys are refused with the closest valid name."""
        import difflib

        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {sorted(known)}"
                raise ValueError(f"unknown parallel setting {key!r}{hint}")
        return cls(**dict(data))

    def short(self) -> str:
        """Compact text such as 'dp2 pp2 tp2 v2 interleaved sp zero1'."""
        parts = [f"dp{self.dp}", f"pp{self.pp}", f"tp{self.tp}"]
        if self.num_virtual > 1:
            parts.append(f"v{self.num_virtual}")
        parts.append(self.schedule)
        if self.sequence_parallel:
            parts.append("sp")
        if self.zero:
            parts.append(f"zero{self.zero}")
        return " ".join(parts)
