"""Sharded GPT checkpoints that load onto the same or a different (dp, pp, tp) layout.

Layout on disk (``path/``)::

    meta.json                 format, GPTConfig, the saving layout, step, and per
                              parameter: full shape, TP split dim, saving pp rank
    shard-pp{P}-tp{T}.pt      from DP rank 0 of each (P, T): {name: {"param": shard,
                              "state": {optimizer tensors shaped like the shard}}}

A loader rebuilds each full tensor it needs from the shards of every old TP
rank of the old pipeline rank that held it, then keeps its own new shard; so
TP, PP and virtual-stage counts may all change. Optimizer state tensors shaped
like their parameter (Adam's moments, momentum) reshard the same way; scalar
state (Adam's ``step``) is copied.

ZeRO-1 (:class:`plait.dp.ShardedOptimizer`) keeps each DP rank's slice of the
optimizer state only; saving gathers it over DP into this same per-parameter
layout and loading cuts it again, so a checkpoint does not depend on whether
ZeRO was on, and moves freely between ZeRO and plain runs of any layout.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..comm import Communicator
from ..dp import ShardedOptimizer
from .config import GPTConfig
from .gpt import GPTStage, full_shape, tp_shard

FORMAT = "plait-gpt-checkpoint-v1"


def _named_params(stages: Sequence[GPTStage]):
    for stage in stages:
        for name, param in stage.named_parameters():
            yield stage, name, param


def _per_param_state(optimizer) -> dict:
    """Optimizer state by parameter, unsharded (a DP collective for a ShardedOptimizer)."""
    if optimizer is None:
        return {}
    if isinstance(optimizer, ShardedOptimizer):
        return optimizer.gather_state()
    return optimizer.state


def save_checkpoint(path, stages: Sequence[GPTStage], mesh,
                    optimizer: Optional[torch.optim.Optimizer | ShardedOptimizer] = None,
                    step: int = 0, num_virtual: int = 1) -> None:
    """Write this rank's shards (DP rank 0 only) and, from global rank 0, ``meta.json``.

    Every rank calls it (it ends with a barrier so the checkpoint is complete on return).
    ``optimizer`` may be a torch optimizer or a ZeRO-1 ``ShardedOptimizer`` (its state is
    gathered over DP first, so the file is the same as without ZeRO).
    """
    path = Path(path)
    dp_rank, pp_rank, tp_rank = mesh.coords
    states = _per_param_state(optimizer)
    names = {}
    shards = {}
    for stage, name, param in _named_params(stages):
        names[name] = {"shape": full_shape(param, stage.comm.size), "split": getattr(param, "tp_split_dim", None),
                       "pp_rank": pp_rank}
        state = states.get(param, {})
        shards[name] = {"param": param.detach().cpu(),
                        "state": {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in state.items()}}
    if dp_rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        torch.save(shards, path / f"shard-pp{pp_rank}-tp{tp_rank}.pt")
    everyone = [None] * mesh.world_size
    torch.distributed.all_gather_object(everyone, names)
    if mesh.rank == 0:
        merged = {}
        for part in everyone:
            merged.update(part)
        meta = {"format": FORMAT, "config": stages[0].cfg.to_dict(), "step": step,
                "layout": {"dp": mesh.dp, "pp": mesh.pp, "tp": mesh.tp, "num_virtual": num_virtual},
                "params": merged}
        (path / "meta.json").write_text(json.dumps(meta, indent=1))
    Communicator.create("torch", None, name="world").barrier()


def read_meta(path) -> dict:
    """The checkpoint's metadata; ValueError naming meta.json when it is missing, empty, truncated,
    not JSON, or not a plait GPT checkpoint's (format, config, layout, params)."""
    meta_file = Path(path) / "meta.json"
    if not meta_file.exists():
        raise ValueError(f"{path} is not a plait checkpoint: no meta.json")
    try:
        text = meta_file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{meta_file}: cannot read it ({exc})") from None
    if not text.strip():
        raise ValueError(f"{meta_file}: the file is empty (an interrupted save?)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_file}: not valid JSON, truncated or damaged ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_file}: unknown checkpoint format {found!r}, expected {FORMAT!r}")
    layout, params = meta.get("layout"), meta.get("params")
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{meta_file}: 'config' must be a mapping of the model's settings")
    if not isinstance(layout, dict) or not all(isinstance(layout.get(a), int) and layout[a] >= 1
                                               for a in ("dp", "pp", "tp")):
        raise ValueError(f"{meta_file}: 'layout' must give dp, pp and tp as whole numbers >= 1, got {layout!r}")
    if not isinstance(params, dict) or not all(
            isinstance(info, dict) and isinstance(info.get("shape"), list) and isinstance(info.get("pp_rank"), int)
            and 0 <= info["pp_rank"] < layout["pp"] and info.get("split") in (None, 0, 1) for info in params.values()):
        raise ValueError(f"{meta_file}: 'params' must map each name to its shape, split (null, 0 or 1) and "
                         f"pp_rank (0 .. {layout['pp'] - 1})")
    if not isinstance(meta.get("step", 0), int):
        raise ValueError(f"{meta_file}: 'step' must be a whole number, got {meta.get('step')!r}")
    return meta


def check_compatible(meta: dict, cfg: GPTConfig) -> None:
    """ValueError naming every model dimension in which the checkpoint differs from ``cfg``."""
    saved = GPTConfig.from_dict(meta["config"]).to_dict()
    mine = cfg.to_dict()
    layout_free = {"sequence_parallel"}  # a layout choice, not a model property
    diffs = [f"{k}: checkpoint {saved[k]!r} vs model {mine[k]!r}" for k in saved
             if k not in layout_free and saved[k] != mine.get(k)]
    if diffs:
        raise ValueError("checkpoint is from an incompatible model: " + "; ".join(diffs))


class _ShardReader:
    """Reads (and caches) shard files and rebuilds full tensors from them."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path, self.meta, self._files = path, meta, {}

    def _file(self, pp_rank: int, tp_rank: int) -> dict:
        """The shard file of (pp_rank, tp_rank); ValueError naming it when it is missing, unreadable,
        truncated, not a shard file, or lacks a parameter meta.json puts there."""
        key = (pp_rank, tp_rank)
        if key not in self._files:
            file = self.path / f"shard-pp{pp_rank}-tp{tp_rank}.pt"
            if not file.is_file():
                raise ValueError(f"{file}: missing; the checkpoint in {self.path} is incomplete")
            try:
                shard = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds for a damaged file
                raise ValueError(f"{file}: cannot read this shard, truncated or damaged "
                                 f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
            expected = [name for name, info in self.meta["params"].items()
                        if info["pp_rank"] == pp_rank and (tp_rank == 0 or info["split"] is not None)]
            if not isinstance(shard, dict):
                raise ValueError(f"{file}: not a plait checkpoint shard (holds a {type(shard).__name__})")
            for name in expected:
                entry = shard.get(name)
                if not (isinstance(entry, dict) and torch.is_tensor(entry.get("param"))
                        and isinstance(entry.get("state"), dict)):
                    raise ValueError(f"{file}: no valid entry for parameter {name!r}, which meta.json places here")
            self._files[key] = shard
        return self._files[key]

    def full(self, name: str, field: Optional[str] = None):
        """The full parameter ``name`` (or its optimizer state ``field``), joined over old TP ranks."""
        info = self.meta["params"][name]
        parts = []
        for tp_rank in range(self.meta["layout"]["tp"] if info["split"] is not None else 1):
            entry = self._file(info["pp_rank"], tp_rank)[name]
            parts.append(entry["param"] if field is None else entry["state"].get(field))
        if not torch.is_tensor(parts[0]) or info["split"] is None or parts[0].dim() == 0:
            return parts[0]
        return torch.cat(parts, dim=info["split"])

    def state_fields(self, name: str) -> list[str]:
        info = self.meta["params"][name]
        return list(self._file(info["pp_rank"], 0)[name]["state"])


@torch.no_grad()
def load_checkpoint(path, stages: Sequence[GPTStage],
                    optimizer: Optional[torch.optim.Optimizer | ShardedOptimizer] = None) -> int:
    """Load parameters (and optimizer state) into this rank's stages, resharding as needed; returns the step.

    With a ZeRO-1 ``ShardedOptimizer`` each rank keeps only its DP slice of the state.
    """
    path = Path(path)
    meta = read_meta(path)
    check_compatible(meta, stages[0].cfg)
    reader = _ShardReader(path, meta)
    states = {}
    for stage, name, param in _named_params(stages):
        if name not in meta["params"]:
            raise ValueError(f"checkpoint {path} has no parameter {name!r}")
        full = reader.full(name)
        if list(full.shape) != meta["params"][name]["shape"]:
            raise ValueError(f"checkpoint {path}: {name} has shape {list(full.shape)}, meta says "
                             f"{meta['params'][name]['shape']}")
        param.copy_(tp_shard(full, param, stage.comm).to(param.dtype))
        if optimizer is not None:
            fields = reader.state_fields(name)
            if fields:
                states[param] = {f: tp_shard(reader.full(name, f), param, stage.comm) for f in fields}
    if isinstance(optimizer, ShardedOptimizer):
        optimizer.load_state(states)
    elif optimizer is not None:
        for param, state in states.items():
            optimizer.state[param] = {f: (v.to(param.device) if torch.is_tensor(v) else v) for f, v in state.items()}
    return int(meta.get("step", 0))


def export_full_state_dict(path) -> dict[str, torch.Tensor]:
    """The whole model from a checkpoint as one state dict, named like the one-process model."""
    meta = read_meta(Path(path))
    reader = _ShardReader(Path(path), meta)
    return {name: reader.full(name) for name in meta["params"]}


@torch.no_grad()
def import_full_state_dict(stages: Sequence[GPTStage], state: dict[str, torch.Tensor]) -> None:
    """Load a full (one-process) state dict into this rank's stages, keeping each parameter's TP shard."""
    for stage, name, param in _named_params(stages):
        if name not in state:
            raise ValueError(f"state dict has no parameter {name!r}")
        param.copy_(tp_shard(state[name], param, stage.comm).to(param.dtype))
