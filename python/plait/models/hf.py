"""Hugging Face checkpoints in and out: each rank reads only its share, any layout writes one checkpoint.

    model = plait.from_pretrained("path/to/hf-model-dir", mesh, dtype=torch.bfloat16)
    plait.save_pretrained(model, "out-dir")     # transformers.AutoModelForCausalLM loads it

Loading builds the model on the meta device (no memory), cuts this rank's stages, and reads
each parameter's TP slice straight from the safetensors files (:class:`SafetensorsSource`);
a pipeline rank reads only its own layers. Saving gathers each tensor over TP, and the
first TP rank of DP replica 0 of each pipeline rank writes its stages' tensors; the file
names and the index are computed identically on every rank, so no rank waits for another
to decide them. Files are written under temporary names and renamed when complete, so a
failed save never leaves a half-written ``model.safetensors`` behind.

Needs the ``hf`` extra: ``pip install plait[hf]``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist

from ..comm import Communicator
from ..config import ParallelConfig
from ..parallel import ParallelModel, SafetensorsSource, check_config, parallelize
from ..parallel.model import resolve_plan

# Files beside the weights that a saved checkpoint should carry along (tokenizer, generation settings).
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
           "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("loading Hugging Face models needs transformers: pip install 'plait[hf]'") from None
    return transformers


def load_config(path: Union[str, Path]):
    """The transformers config of a local model directory, with a clear error for anything else."""
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"{path}: not a directory; plait loads local transformers model directories "
                         f"(config.json + safetensors), nothing is downloaded")
    if not (directory / "config.json").is_file():
        raise ValueError(f"{path}: no config.json; is this a transformers model directory?")
    transformers = _transformers()
    try:
        return transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (ValueError, OSError, KeyError) as err:
        raise ValueError(f"{directory / 'config.json'}: not a usable transformers config ({err})") from None


def build_on_meta(config, dtype: Optional[torch.dtype] = None):
    """The causal LM of ``config`` with every parameter on the meta device (allocates nothing)."""
    transformers = _transformers()
    with torch.device("meta"):
        try:
            model = transformers.AutoModelForCausalLM.from_config(config)
        except ValueError as err:
            raise ValueError(f"transformers cannot build a causal LM for model_type={config.model_type!r}: "
                             f"{err}") from None
    return model


def _config_dtype(config) -> Optional[torch.dtype]:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def from_pretrained(path: Union[str, Path], mesh, dtype: Optional[torch.dtype] = None, *, plan=None,
                    config: Optional[ParallelConfig] = None, overlap: str = "auto") -> ParallelModel:
    """Load a transformers model directory onto ``mesh``; each rank reads only its slices.

    ``dtype`` None keeps the checkpoint config's dtype (float32 when it names none). Returns a
    :class:`~plait.ParallelModel` holding this rank's stages, in eval mode as transformers returns it
    (call ``.train()`` to train with dropout). A config field whose math plait does not support is
    refused by name before any tensor is read (:mod:`plait.parallel.families`).
    """
    hf_config = load_config(path)
    check_config(hf_config, None if plan is None else resolve_plan(None, plan).family)
    source = SafetensorsSource(path)
    model = build_on_meta(hf_config)
    _check_names(model, source, path)
    dtype = dtype or _config_dtype(hf_config) or torch.float32
    parallel = parallelize(model, mesh, plan, config=config, overlap=overlap, source=source, dtype=dtype)
    parallel.source_dir = str(path)
    return parallel.eval()


def _check_names(model, source: SafetensorsSource, path) -> None:
    """Every parameter must be in the checkpoint (a tied head may be absent), with the model's shape."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    names = source.names()
    for name, param in model.named_parameters(remove_duplicate=False):
        if name not in names:
            if tied and name.endswith("lm_head.weight"):
                continue
            raise ValueError(f"{path}: the checkpoint has no tensor {name!r}, which "
                             f"{type(model).__name__} needs; is it a checkpoint of another model?")
        shape = source.shape(name)
        if tuple(shape) != tuple(param.shape):
            raise ValueError(f"{path}: tensor {name!r} has shape {list(shape)} but the config "
                             f"({type(model).__name__}) needs {list(param.shape)}; the checkpoint is of another "
                             f"model or the config was edited")


def _file_plan(sizes_by_pp: list[dict[str, int]], max_bytes: int) -> list[list[str]]:
    """Names grouped into files: pipeline ranks in order, each file at most ``max_bytes`` (one tensor at least)
    and holding one pipeline rank's tensors only (each file has a single writer)."""
    files: list[list[str]] = []
    current, used = [], 0
    for sizes in sizes_by_pp:
        if current:
            files.append(current)
            current, used = [], 0
        for name, nbytes in sizes.items():
            if current and used + nbytes > max_bytes:
                files.append(current)
                current, used = [], 0
            current.append(name)
            used += nbytes
    if current:
        files.append(current)
    return files


def save_pretrained(model: ParallelModel, path: Union[str, Path], *,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write a transformers-format directory (config, safetensors split by size, index) from any layout.

    Every rank calls it (a collective over the mesh). Tokenizer and generation files of the
    directory the model was loaded from are copied along.
    """
    from safetensors.torch import save_file

    if not isinstance(model, ParallelModel):
        raise ValueError(f"save_pretrained takes a plait.ParallelModel, got {type(model).__name__}")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    mesh = model.mesh
    path = Path(path)
    tensors = model.full_state_dict(everywhere=False)          # TP collective
    writer = mesh.dp_rank == 0 and mesh.tp_rank == 0
    mine = {name: t.numel() * t.element_size() for name, t in tensors.items()} if writer else {}
    everyone: list = [None] * mesh.world_size
    dist.all_gather_object(everyone, (mesh.pp_rank, mine))
    by_pp = [{} for _ in range(mesh.pp)]
    for pp_rank, sizes in everyone:
        by_pp[pp_rank].update(sizes)
    files = _file_plan(by_pp, max_shard_bytes)
    names = ["model.safetensors"] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    error = None
    try:
        if mesh.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
        Communicator.create("torch", None, name="world").barrier()
        if writer:
            for file_name, members in zip(names, files):
                own = {n: tensors[n].contiguous() for n in members if n in tensors}
                if own:
                    tmp = path / f".{file_name}.tmp-{os.getpid()}"
                    save_file(own, str(tmp), metadata={"format": "pt"})
                    os.replace(tmp, path / file_name)
        if mesh.rank == 0:
            _write_meta(model, path, names, files, sum(sum(s.values()) for s in by_pp))
    except OSError as err:
        error = f"saving to {path} failed on rank {mesh.rank}: {err}"
    flags = [None] * mesh.world_size
    dist.all_gather_object(flags, error)
    failed = [f for f in flags if f]
    if failed:
        raise ValueError("; ".join(failed))


def _write_meta(model: ParallelModel, path: Path, names: list[str], files: list[list[str]], total: int) -> None:
    config = model.model_config
    if config is not None and hasattr(config, "save_pretrained"):
        config.dtype = model.dtype
        config.save_pretrained(str(path))
    if len(files) > 1:
        weight_map = {n: file_name for file_name, members in zip(names, files) for n in members}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        tmp = path / ".model.safetensors.index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, path / "model.safetensors.index.json")
    if model.source_dir and Path(model.source_dir).resolve() != path.resolve():
        for name in _COPIED:
            src = Path(model.source_dir) / name
            if src.is_file():
                shutil.copyfile(src, path / name)
