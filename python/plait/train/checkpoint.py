"""Training checkpoints that never lose a run and reload on any (dp, pp, tp) layout.

A checkpoint is a directory ``<save>/step-00000042``:

==========================  ===================================================================
file                        holds
==========================  ===================================================================
config.json, model*.safe…   the model as a transformers directory (:func:`plait.save_pretrained`),
                            so ``plait.from_pretrained`` reloads it on any layout
optimizer/                  AdamW state as whole tensors named ``<parameter>.exp_avg`` and
                            ``<parameter>.exp_avg_sq``, laid out like a transformers directory
                            (one file per pipeline rank and ``model.safetensors.index.json``);
                            each rank reads back its own TP slice exactly as it reads parameters
train_state.json            step, Adam's step count, learning rate, RNG state, the data settings
                            (fingerprint) and every parameter's shape, written last
==========================  ===================================================================

Writing is atomic: everything goes into ``<save>/.tmp-step-…``, every file is flushed
(fsync), and the directory is renamed into place; only then are checkpoints beyond the last
``keep`` removed. A failure while writing (disk full, no permission) removes the temporary
directory, leaves every earlier checkpoint as it was, and raises on every rank saying so.
:func:`check_checkpoint` validates a checkpoint completely (every file readable and whole,
every tensor of the job's model present with its shape, the same data settings) on every
rank before any communication, so a bad checkpoint is refused before training starts.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from ..parallel import SafetensorsSource, ShardSpec

STATE_FILE = "train_state.json"
OPTIMIZER_DIR = "optimizer"
STEP_DIR = re.compile(r"^step-(\d{8})$")
FORMAT = 1


def step_dirs(save: Union[str, Path]) -> list[Path]:
    """The complete checkpoints of a --save directory, oldest first."""
    save = Path(save)
    if not save.is_dir():
        return []
    return sorted((p for p in save.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)


def resolve_resume(resume: Optional[str], save: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume from: ``resume`` itself, the latest in it (a --save directory), or the latest
    in ``save`` for ``'latest'`` (None when that holds none yet: the job starts fresh)."""
    if resume is None:
        return None
    if resume == "latest":
        found = step_dirs(save)
        return found[-1] if found else None
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    found = step_dirs(path)
    if found:
        return found[-1]
    if not path.exists():
        raise ValueError(f"{resume}: no such checkpoint or --save directory")
    raise ValueError(f"{resume}: not a plait checkpoint (no {STATE_FILE}) and no step-* checkpoints in it")


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise ValueError(f"{path}: missing; {checkpoint} is not a complete plait checkpoint")
    try:
        state = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: truncated or corrupt ({err})") from None
    need = ("format", "step", "adam_step", "shapes", "fingerprint", "optimizer_keys", "rng")
    if not isinstance(state, dict) or any(k not in state for k in need):
        raise ValueError(f"{path}: not a plait train state (expected the keys {need})")
    if state["format"] != FORMAT:
        raise ValueError(f"{path}: checkpoint format {state['format']!r}, this plait reads format {FORMAT}")
    for key, what, ok in _STATE_FIELDS:
        if not ok(state.get(key)):
            raise ValueError(f"{path}: {key!r} must be {what}, got {state.get(key)!r}; the file is damaged")
    return state


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rng_state(value: Any) -> bool:
    """Whether ``value`` is a torch CPU generator state as saved (base64, the length torch uses)."""
    try:
        return isinstance(value, str) and len(base64.b64decode(value, validate=True)) == torch.get_rng_state().numel()
    except ValueError:
        return False


# what read_state demands of each field of train_state.json, so later code never meets a wrong type
_STATE_FIELDS = (
    ("step", "a whole number", _whole),
    ("adam_step", "a number >= 0", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0),
    ("shapes", "a mapping of tensor names to shapes", lambda v: isinstance(v, dict) and all(
        isinstance(s, list) and all(_whole(d) for d in s) for s in v.values())),
    ("fingerprint", "a mapping of the data settings", lambda v: isinstance(v, dict)),
    ("optimizer_keys", "a list of names", lambda v: isinstance(v, list) and all(isinstance(k, str) for k in v)),
    ("rng", "a mapping with the torch RNG state", lambda v: isinstance(v, dict) and _rng_state(v.get("torch"))),
    ("model", "a mapping describing the model, or absent", lambda v: v is None or isinstance(v, dict)),
)


def check_checkpoint(checkpoint: Path, shapes: dict[str, tuple[int, ...]], fingerprint: dict[str, Any],
                     tied_head: Optional[str]) -> dict[str, Any]:
    """The checkpoint's train state, after checking that it fits the job (module doc); ValueError otherwise.

    ``shapes``: every parameter of the job's model by name; ``tied_head``: the head's name when it
    is tied to the embedding (then it is stored as the embedding).
    """
    state = read_state(checkpoint)
    differ = {k: (state["fingerprint"].get(k), v) for k, v in fingerprint.items() if state["fingerprint"].get(k) != v}
    if differ:
        detail = ", ".join(f"{k}: checkpoint {a!r}, job {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"{checkpoint}: made by a job with other data settings ({detail}); resuming would not "
                         f"continue that run")
    expected = {n: list(s) for n, s in shapes.items() if n != tied_head}
    if state["shapes"] != expected:
        diff = _first_difference(state["shapes"], expected)
        raise ValueError(f"{checkpoint}: a checkpoint of another model ({diff})")
    model = SafetensorsSource(checkpoint)    # opens every file: checks each header and the file's length
    optimizer = SafetensorsSource(checkpoint / OPTIMIZER_DIR)
    for name, shape in expected.items():
        _check_tensor(model, checkpoint, name, shape)
        for key in state["optimizer_keys"]:
            _check_tensor(optimizer, checkpoint / OPTIMIZER_DIR, f"{name}.{key}", shape)
    return state


def _check_tensor(source: SafetensorsSource, where: Path, name: str, shape: list[int]) -> None:
    if name not in source.names():
        raise ValueError(f"{where}: tensor {name!r} is missing; the checkpoint is incomplete")
    if list(source.shape(name)) != list(shape):
        raise ValueError(f"{where}: tensor {name!r} has shape {list(source.shape(name))}, expected {shape}")


def _first_difference(saved: dict, expected: dict) -> str:
    for name in expected:
        if name not in saved:
            return f"it has no tensor {name!r}, which the job's model needs"
        if saved[name] != expected[name]:
            return f"tensor {name!r} has shape {saved[name]}, the job's model needs {expected[name]}"
    extra = sorted(set(saved) - set(expected))
    return f"it has tensors the job's model lacks, e.g. {extra[0]!r}" if extra else "its tensors differ"


def check_writable(save: Union[str, Path]) -> None:
    """ValueError unless checkpoints can be written into ``save`` (created if missing)."""
    save = Path(save)
    try:
        save.mkdir(parents=True, exist_ok=True)
        probe = save / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{save}: cannot write checkpoints there ({err.strerror or err})") from None


# --------------------------------------------------------------------------- saving
def save_checkpoint(save: Union[str, Path], step: int, model, optimizer, extra: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint of ``step`` atomically (module doc); every rank calls it. Returns its path."""
    from ..models.hf import save_pretrained
    from safetensors.torch import save_file

    mesh = model.mesh
    save = Path(save)
    final = save / f"step-{step:08d}"
    tmp = save / f".tmp-step-{step:08d}"
    error: Optional[str] = None
    try:
        if mesh.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / OPTIMIZER_DIR).mkdir(parents=True)
    except OSError as err:
        error = f"rank {mesh.rank}: {err}"
    _raise_if_any(error, save, final)
    try:
        save_pretrained(model, tmp)        # a collective; raises on every rank on failure
    except ValueError as err:
        _raise_if_any(str(err), save, final, cleanup=tmp if mesh.rank == 0 else None)
    states, shapes = optimizer.param_states(), {}
    tensors: dict[str, torch.Tensor] = {}
    keys = sorted({k for s in states.values() for k in s if k != "step"})
    adam_step = next((float(s["step"]) for s in states.values() if "step" in s), 0.0)
    skip = _tied_head(model)
    for name, param in model.named_model_parameters():
        for key in keys:
            tensors[f"{name}.{key}"] = model.gather_full(name, states[name][key]).contiguous()
        # the whole parameter's shape is its state's; gathered only when there is no state
        shapes[name] = list(tensors[f"{name}.{keys[0]}"].shape if keys else model.gather_full(name, param.detach()).shape)
    for name in list(shapes):
        if name == skip:
            shapes.pop(name)
            for key in keys:
                tensors.pop(f"{name}.{key}")
    writer = mesh.dp_rank == 0 and mesh.tp_rank == 0
    file_name = f"part-{mesh.pp_rank:05d}-of-{mesh.pp:05d}.safetensors"
    mine = (sorted(tensors) if writer else [], shapes if writer else {})
    everyone: list = [None] * mesh.world_size
    dist.all_gather_object(everyone, (mesh.pp_rank, mine))
    try:
        if writer and tensors:
            save_file(tensors, str(tmp / OPTIMIZER_DIR / file_name), metadata={"format": "pt"})
        if mesh.rank == 0:
            weight_map, all_shapes = {}, {}
            for pp_rank, (names, part_shapes) in everyone:
                weight_map.update({n: f"part-{pp_rank:05d}-of-{mesh.pp:05d}.safetensors" for n in names})
                all_shapes.update(part_shapes)
            (tmp / OPTIMIZER_DIR / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
            state = dict(format=FORMAT, step=step, adam_step=adam_step, optimizer_keys=keys,
                         shapes=dict(sorted(all_shapes.items())),
                         rng={"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}, **extra)
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    except OSError as err:
        error = f"rank {mesh.rank}: {err}"
    _raise_if_any(error, save, final, cleanup=tmp if mesh.rank == 0 else None)
    try:
        if mesh.rank == 0:
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(save)
            for old in step_dirs(save)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        error = f"rank {mesh.rank}: {err}"
    _raise_if_any(error, save, final, cleanup=tmp if mesh.rank == 0 else None)
    return final


def _tied_head(model) -> Optional[str]:
    return model.plan.head + ".weight" if model.tied else None


def _raise_if_any(error: Optional[str], save: Path, final: Path, cleanup: Optional[Path] = None) -> None:
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [e for e in errors if e]
    if failed:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        previous = step_dirs(save)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise ValueError(f"writing checkpoint {final} failed ({'; '.join(failed)}); {kept}")


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- loading
def load_optimizer_state(checkpoint: Path, state: dict[str, Any], model, optimizer) -> None:
    """Give this rank's parameters their optimizer state from the checkpoint (their TP slices). Local."""
    source = SafetensorsSource(checkpoint / OPTIMIZER_DIR)
    tied = _tied_head(model)
    embed = model.plan.embed + ".weight"
    scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    states = {}
    for name, param in model.named_model_parameters():
        stored = embed if name == tied else name
        spec = model.spec_of(name)
        entry = {"step": torch.tensor(state["adam_step"], dtype=scalar_dtype)}
        for key in state["optimizer_keys"]:
            value = source.read(ShardSpec(f"{stored}.{key}", spec.dim, spec.index, spec.transpose, spec.replicated))
            entry[key] = (value.t() if spec.transpose else value).contiguous().to(param.device)
        states[name] = entry
    optimizer.load_param_states(states)


def restore_rng(state: dict[str, Any]) -> None:
    """The torch RNG state saved by rank 0 (so dropout continues as it would have)."""
    import numpy as np

    raw = np.frombuffer(base64.b64decode(state["rng"]["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))
