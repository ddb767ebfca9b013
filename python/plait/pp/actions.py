"""The schedule IR's atoms: one action = (stage, kind, microbatch), printed as ``1F3``.

A pipeline schedule is one list of actions per rank (see :mod:`plait.pp.schedule`).
The compact form follows ``torch.distributed.pipelining``: stage index, kind, microbatch
index, so ``1F3`` is "stage 1 runs the forward of microbatch 3" and ``1SEND_B2`` is
"stage 1 sends the gradient of its input for microbatch 2 to stage 0":

==========  ===========================================================================
kind        meaning for ``<stage><kind><mb>``
==========  ===========================================================================
F           forward of ``stage`` on microbatch ``mb``
B           full backward (input and weight gradients)
I           input-gradient half of the backward (zero-bubble schedules)
W           weight-gradient half of the backward, after the matching I
SEND_F      ``stage`` sends its forward output for ``mb`` to ``stage + 1``
RECV_F      ``stage`` receives its forward input for ``mb`` from ``stage - 1``
SEND_B      ``stage`` sends the gradient of its input for ``mb`` to ``stage - 1``
RECV_B      ``stage`` receives the gradient of its output for ``mb`` from ``stage + 1``
==========  ===========================================================================

Stages are model stages: with ``num_virtual`` chunks per rank there are
``num_ranks * num_virtual`` of them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Kind(str, Enum):
    """What an action does; the value is its spelling in the compact form."""

    F = "F"
    B = "B"
    I = "I"  # noqa: E741 - the name used by the zero-bubble paper and torch
    W = "W"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    def __str__(self) -> str:
        return self.value

    __hash__ = str.__hash__  # C speed (Enum's own hash is Python code); equal to hash(value)

    @property
    def is_compute(self) -> bool:
        return self in COMPUTE

    @property
    def is_comm(self) -> bool:
        return not self.is_compute


COMPUTE = frozenset({Kind.F, Kind.B, Kind.I, Kind.W})
BACKWARD_INPUT = frozenset({Kind.B, Kind.I})  # the kinds that produce a stage's input gradient

# Longest names first so "SEND_F" is not read as stage, "S", ...
_ACTION_RE = re.compile(r"^\s*(\d+)\s*(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Action:
    """One step of one rank: ``kind`` applied by model ``stage`` to ``microbatch``."""

    stage: int
    kind: Kind
    microbatch: int

    def __post_init__(self) -> None:
        if self.kind.__class__ is not Kind:
            object.__setattr__(self, "kind", Kind(self.kind))
        for name, value in (("stage", self.stage), ("microbatch", self.microbatch)):
            if value.__class__ is not int or value < 0:  # exact int: no bools, no floats
                raise ValueError(f"Action {name} must be a non-negative int, got {value!r}")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> "Action":
        """Read the compact form back: ``Action.parse("0SEND_B2") == Action(0, Kind.SEND_B, 2)``."""
        match = _ACTION_RE.match(text)
        if match is None:
            raise ValueError(f"cannot read action {text!r}: write <stage><kind><microbatch>, e.g. '1F3' or "
                             f"'0SEND_B2', with kind one of {[k.value for k in Kind]}")
        return cls(int(match.group(1)), Kind(match.group(2)), int(match.group(3)))


def parse_action(text: str) -> Action:
    """Shorthand for :meth:`Action.parse`."""
    return Action.parse(text)
