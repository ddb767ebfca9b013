"""ZeRO-1 optimizer state to and from the ordinary per-parameter layout (for checkpoints).

The wrapped optimizer keeps state per :class:`~plait.dp.shards.Piece`, this
rank's slices of the flat buckets. A checkpoint, or a plain run, wants it per
parameter, whole. Gathering concatenates a bucket's pieces (they tile this
rank's range in order), all-gathers over DP and cuts the result at parameter
boundaries; loading builds the flat layout from per-parameter state and keeps
this rank's pieces. Scalar state (Adam's ``step``) is the same for every piece
and parameter, and is copied.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..comm import Communicator
from .buckets import Bucket
from .shards import Piece


@torch.no_grad()
def gather_state(buckets: Sequence[Bucket], pieces: Sequence[Sequence[Piece]], optimizer: torch.optim.Optimizer,
                 comm: Communicator, scalar_keys: frozenset[str]) -> dict[nn.Parameter, dict[str, Any]]:
    """Every parameter's whole state; a DP collective (every rank calls it, all get the same)."""
    out: dict[nn.Parameter, dict[str, Any]] = {}
    for bucket, mine in zip(buckets, pieces):
        states = [optimizer.state.get(piece.tensor, {}) for piece in mine]
        if not states[0]:
            continue  # not stepped yet: the same on every rank, as every piece steps every step
        keys = list(states[0])
        gathered = {key: comm.all_gather(torch.cat([state[key] for state in states]), dim=0)
                    for key in keys if key not in scalar_keys}
        for i, param in enumerate(bucket.params):
            lo, hi = bucket.offsets[i], bucket.offsets[i] + param.numel()
            out[param] = {key: (gathered[key][lo:hi].view_as(param).clone() if key in gathered
                                else _copy(states[0][key])) for key in keys}
    return out


@torch.no_grad()
def load_state(states: Mapping[nn.Parameter, Mapping[str, Any]], buckets: Sequence[Bucket],
               pieces: Sequence[Sequence[Piece]], optimizer: torch.optim.Optimizer,
               scalar_keys: frozenset[str]) -> None:
    """Set the state of this rank's pieces from per-parameter ``states``; ValueError on what cannot be sharded."""
    for bucket, mine in zip(buckets, pieces):
        have = [bool(states.get(param)) for param in bucket.params]
        if not any(have):
            for piece in mine:
                optimizer.state.pop(piece.tensor, None)
            continue
        if not all(have):
            raise ValueError(f"load_state: {have.count(False)} of the {len(have)} parameters of bucket "
                             f"{bucket.index} have no optimizer state; give state for all or none of them")
        loaded: list[dict[str, Any]] = [{} for _ in mine]
        for key, value in states[bucket.params[0]].items():
            if key in scalar_keys:
                for param in bucket.params[1:]:
                    if not _same(states[param].get(key), value):
                        raise ValueError(f"load_state: state {key!r} differs between parameters of one bucket "
                                         f"({_describe(value)} vs {_describe(states[param].get(key))}); "
                                         "ZeRO-1 keeps one value per bucket")
                for state in loaded:
                    state[key] = _copy(value)
                continue
            flat = torch.zeros(bucket.buffer.numel(), dtype=value.dtype, device=bucket.buffer.device)
            for i, param in enumerate(bucket.params):
                part = states[param].get(key)
                if not torch.is_tensor(part) or part.shape != param.shape:
                    raise ValueError(f"load_state: state {key!r} of a parameter of shape {list(param.shape)} "
                                     f"is {_describe(part)}; elementwise state must have its parameter's shape")
                flat[bucket.offsets[i]:bucket.offsets[i] + param.numel()] = part.reshape(-1)
            for piece, state in zip(mine, loaded):
                state[key] = flat[piece.lo:piece.hi].clone()
        for piece, state in zip(mine, loaded):
            optimizer.state[piece.tensor] = state


def _copy(value: Any) -> Any:
    return value.clone() if torch.is_tensor(value) else value


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return a == b


def _describe(value: Any) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {list(value.shape)}" if value.dim() else f"{value.item()!r}"
    return repr(value)
