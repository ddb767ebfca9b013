"""``Schedule``: one action list per rank, plus how stages are placed on ranks.

A schedule is data. Generators (:mod:`plait.pp.schedules`) and users (text or CSV,
:mod:`plait.pp.schedule_io`) make compute-only schedules; :meth:`Schedule.lower` adds the
communication; :meth:`Schedule.validate` proves it correct and deadlock-free;
:meth:`Schedule.simulate` predicts its bubble and memory; :class:`plait.PipelineEngine`
runs it.

Vocabulary: ``num_ranks`` pipeline ranks (the mesh's ``pp``), each holding
``num_virtual`` model stages; model stage ``s`` runs on rank ``placement[s]``
(looping placement ``s % num_ranks`` for the built-in schedules).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

from .actions import Action, Kind

ActionLike = Union[Action, str]


def _as_action(item: ActionLike) -> Action:
    if isinstance(item, Action):
        return item
    if isinstance(item, str):
        return Action.parse(item)
    raise ValueError(f"a schedule holds Actions or their compact strings like '1F3', got {item!r}")


@dataclass(frozen=True)
class Schedule:
    """Per-rank action lists (``actions[rank]``) for ``num_microbatches`` microbatches.

    Build one with :meth:`from_lists` (which infers what is left out), a generator
    (:func:`plait.pp.build_schedule`) or a parser (:func:`plait.pp.parse_schedule`).
    The constructor only normalizes; :meth:`validate` finds the faults.
    """

    actions: tuple[tuple[Action, ...], ...]
    num_microbatches: int
    placement: tuple[int, ...]
    name: str = "custom"
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    # ------------------------------------------------------------- construction
    @classmethod
    def from_lists(cls, lists: Sequence[Iterable[ActionLike]], num_microbatches: Optional[int] = None,
                   placement: Optional[Sequence[int]] = None, name: str = "custom") -> "Schedule":
        """Make a schedule from per-rank lists of Actions or strings such as ``"1F3"``.

        ``num_microbatches`` defaults to the largest microbatch index + 1; ``placement``
        (stage -> rank) to the rank where each stage's first action appears.
        """
        rows = tuple(tuple(_as_action(a) for a in row) for row in lists)
        if not rows:
            raise ValueError("a schedule needs at least one rank (one action list)")
        everything = [a for row in rows for a in row]
        if num_microbatches is None:
            num_microbatches = 1 + max((a.microbatch for a in everything), default=0)
        if placement is None:
            num_stages = 1 + max((a.stage for a in everything), default=0)
            found: dict[int, int] = {}
            for rank, row in enumerate(rows):
                for action in row:
                    if action.kind.is_compute:
                        found.setdefault(action.stage, rank)
            missing = [s for s in range(num_stages) if s not in found]
            if missing:
                raise ValueError(f"stages {missing} have no compute action, so their rank is unknown; "
                                 f"add their actions or pass placement=[rank of each stage]")
            placement = [found[s] for s in range(num_stages)]
        placement = tuple(int(r) for r in placement)
        if not isinstance(num_microbatches, int) or num_microbatches < 1:
            raise ValueError(f"num_microbatches must be a positive int, got {num_microbatches!r}")
        bad = [r for r in placement if not 0 <= r < len(rows)]
        if bad:
            raise ValueError(f"placement names ranks {bad}, but the schedule has {len(rows)} ranks")
        return cls(rows, num_microbatches, placement, name)

    # --------------------------------------------------------------- properties
    @property
    def num_ranks(self) -> int:
        """Pipeline ranks (``pp``): one action list each."""
        return len(self.actions)

    @property
    def num_stages(self) -> int:
        """Model stages, ``num_ranks * num_virtual`` for the built-in schedules."""
        return len(self.placement)

    @property
    def num_virtual(self) -> int:
        """Model stages per rank (the most any rank holds)."""
        return max(len(self.stages_of(r)) for r in range(self.num_ranks))

    def stages_of(self, rank: int) -> list[int]:
        """Model stages that run on ``rank``, ascending."""
        return [s for s, r in enumerate(self.placement) if r == rank]

    @property
    def is_lowered(self) -> bool:
        """Whether the lists already hold communication actions."""
        if "lowered?" not in self._cache:
            self._cache["lowered?"] = any(a.kind.is_comm for row in self.actions for a in row)
        return self._cache["lowered?"]

    @property
    def is_forward_only(self) -> bool:
        """Whether the schedule holds forwards only (inference, ``eval_step``)."""
        if "forward?" not in self._cache:
            self._cache["forward?"] = all(a.kind in (Kind.F, Kind.SEND_F, Kind.RECV_F)
                                          for row in self.actions for a in row)
        return self._cache["forward?"]

    # ---------------------------------------------------------------- passes
    def compute_only(self) -> "Schedule":
        """The same schedule without communication actions."""
        rows = tuple(tuple(a for a in row if a.kind.is_compute) for row in self.actions)
        return Schedule(rows, self.num_microbatches, self.placement, self.name)

    def lower(self) -> "Schedule":
        """This schedule with SEND/RECV actions added (see :mod:`plait.pp.lowering`)."""
        if "lowered" not in self._cache:
            from .lowering import lower

            self._cache["lowered"] = lower(self)
        return self._cache["lowered"]

    def forward_only(self) -> "Schedule":
        """Only the forwards, in the same order: the schedule ``eval_step`` runs."""
        from .lowering import forward_only

        return forward_only(self)

    def validate(self) -> "Schedule":
        """Raise :class:`~plait.pp.validate.ScheduleError` (a ValueError) with a step x rank grid
        on any fault; return ``self`` when the schedule is correct and cannot deadlock."""
        if "valid" not in self._cache:
            from .validate import validate

            validate(self)
            self._cache["valid"] = True
        return self

    def simulate(self, forward: float = 1.0, backward: float = 2.0, weight: Optional[float] = None,
                 p2p: float = 0.0):
        """Event simulation; see :func:`plait.pp.simulate.simulate` for the costs' meaning."""
        from .simulate import simulate

        return simulate(self, forward=forward, backward=backward, weight=weight, p2p=p2p)

    # ------------------------------------------------------------------ output
    def to_text(self) -> str:
        """Directives and one line per rank, ``rank 0: 0F0 0F1 ...``; ``parse_schedule`` reads it back."""
        lines = [f"name: {self.name}", f"microbatches: {self.num_microbatches}",
                 "placement: " + " ".join(str(r) for r in self.placement)]
        lines += [f"rank {r}: " + " ".join(str(a) for a in row) for r, row in enumerate(self.actions)]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """One row per rank, one action per cell (the layout torch's pipelining reads)."""
        return "\n".join(",".join(str(a) for a in row) for row in self.actions) + "\n"

    def grid(self, marks: Optional[dict[tuple[int, int], str]] = None, rows: Optional[range] = None) -> str:
        """The schedule as a step x rank table; ``marks[(rank, step)]`` flags cells."""
        from .validate import render_grid

        return render_grid(self, marks or {}, rows)

    def __str__(self) -> str:
        return self.grid()
