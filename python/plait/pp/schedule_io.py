"""Read a schedule users wrote by hand, as plain text or CSV.

One line per rank; actions in the compact form (``1F3``, ``0I2``, ``2SEND_F0``)
separated by spaces and/or commas. A line may start with ``rank N:`` (else lines are
ranks 0, 1, ... in order). ``#`` starts a comment. Optional directive lines::

    name: my-schedule
    microbatches: 4
    placement: 0 1 0 1        # stage -> rank; default: where each stage's first action is
    rank 0: 0F0 0F1 2F0 ...
    rank 1: 1F0 ...

A CSV file with one row per rank and one action per cell (what
``torch.distributed.pipelining`` writes) reads the same way. :meth:`Schedule.to_text`
writes this format, so text round-trips.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence, Union

from .actions import Action
from .schedule import Schedule

_RANK_RE = re.compile(r"^rank\s*(\d+)\s*:(.*)$", re.IGNORECASE)
_DIRECTIVE_RE = re.compile(r"^(name|microbatches|placement)\s*:(.*)$", re.IGNORECASE)


def _tokens(text: str) -> list[str]:
    return [t.strip().strip('"').strip("'") for t in re.split(r"[,\s]+", text) if t.strip().strip('"\'')]


def parse_schedule(text: str, num_microbatches: Optional[int] = None,
                   placement: Optional[Sequence[int]] = None, name: Optional[str] = None) -> Schedule:
    """Parse the text/CSV form above into a compute-only or lowered :class:`Schedule`.

    Arguments override the directives in the text. The result is not validated yet:
    call ``.validate()`` to check it (the engine does). Text that is not a schedule is a
    ValueError saying which line is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"parse_schedule takes the schedule's text (a str), got {type(text).__name__}; "
                         f"to read a file use load_schedule(path)")
    rows: dict[int, list[Action]] = {}
    next_rank = 0
    found: dict[str, object] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line.strip(", \t"):
            continue
        directive = _DIRECTIVE_RE.match(line)
        if directive:
            key, value = directive.group(1).lower(), directive.group(2).strip()
            try:
                found[key] = (value if key == "name" else int(value) if key == "microbatches"
                              else [int(t) for t in _tokens(value)])
            except ValueError:
                raise ValueError(f"line {number}: cannot read {key!r} from {value!r}; write e.g. "
                                 f"'microbatches: 8' or 'placement: 0 1 0 1'") from None
            continue
        explicit = _RANK_RE.match(line)
        rank, body = (int(explicit.group(1)), explicit.group(2)) if explicit else (next_rank, line)
        if rank in rows:
            raise ValueError(f"line {number}: rank {rank} is listed twice; give each rank one line")
        try:
            rows[rank] = [Action.parse(token) for token in _tokens(body)]
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
        next_rank = rank + 1
    if not rows:
        raise ValueError("the schedule text holds no actions: write one line of actions per rank")
    missing = [r for r in range(max(rows) + 1) if r not in rows]
    if missing:
        raise ValueError(f"ranks {missing} have no line; every rank from 0 to {max(rows)} needs one "
                         f"('rank N:' with nothing after it for an idle rank)")
    return Schedule.from_lists([rows[r] for r in range(len(rows))],
                               num_microbatches if num_microbatches is not None else found.get("microbatches"),
                               placement if placement is not None else found.get("placement"),
                               name or str(found.get("name", "custom")))


def load_schedule(path: Union[str, Path], **kwargs) -> Schedule:
    """Read a schedule file (text or CSV, same rules); ``kwargs`` as for :func:`parse_schedule`.

    A missing, unreadable, binary or malformed file is a ValueError that names the file.
    """
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a schedule file (not text)") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the schedule file ({exc.strerror or exc})") from None
    try:
        return parse_schedule(text, **kwargs)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
