"""Which model a training job trains, and how each rank builds its share of it.

=====================  =====================================================================
job setting            model
=====================  =====================================================================
``model: DIR``         a transformers model directory (fine-tuning): ``plait.from_pretrained``
``config: FILE``       a transformers ``config.json`` from scratch, weights from ``seed``
``gpt: SPEC``          plait's reference GPT (:mod:`plait.models.presets`) from scratch: every
                       parameter drawn from (``seed``, its name), so every layout starts from
                       the same model (:func:`plait.models.gpt.init_parameters`)
=====================  =====================================================================

All three go through ``plait.parallelize`` with their plan. Resuming builds the model on the
meta device and reads this rank's slices from the checkpoint's safetensors: a transformers
model through ``plait.from_pretrained``, the GPT through ``parallelize`` with a
:class:`~plait.parallel.SafetensorsSource` (its checkpoint has no transformers config).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .job import TrainJob

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def model_config(job: TrainJob):
    """The job's model config: a :class:`~plait.models.GPTConfig` (``gpt``) or a transformers config."""
    if job.gpt is not None:
        from ..models.presets import gpt_config

        return gpt_config(job.gpt, job.seq, DTYPES[job.dtype])
    from ..models.hf import _transformers, load_config
    from ..parallel.families import check_config

    if job.model is not None:
        config = load_config(job.model)
        check_config(config)
        return config
    path = Path(job.config)
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    try:
        data = json.loads(path.read_text())
        model_type = data.pop("model_type")
    except (ValueError, KeyError, AttributeError, TypeError) as err:
        raise ValueError(f"{path}: not a transformers config.json with a model_type ({err})") from None
    try:
        config = _transformers().AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a usable transformers config ({err})") from None
    check_config(config)
    return config


def _is_gpt(config) -> bool:
    from ..models.config import GPTConfig

    return isinstance(config, GPTConfig)


def _on_meta(config):
    """The plain model of ``config`` with every parameter on the meta device."""
    if _is_gpt(config):
        from ..models.gpt import GPT

        with torch.device("meta"):
            return GPT(config)
    from ..models.hf import build_on_meta

    return build_on_meta(config)


def parameter_shapes(config) -> tuple[dict[str, tuple[int, ...]], Optional[str]]:
    """Every parameter's shape (built on the meta device) and the tied head's name, if tied."""
    from ..parallel.model import resolve_plan

    meta = _on_meta(config)
    plan = resolve_plan(meta, None)
    shapes = {n: tuple(p.shape) for n, p in meta.named_parameters()}
    tied = plan.head + ".weight" if plan.tied and getattr(config, "tie_word_embeddings", True) else None
    return shapes, tied


def build_model(job: TrainJob, config, mesh, checkpoint: Optional[Path]):
    """This rank's :class:`~plait.ParallelModel` of the job's model (from ``checkpoint`` when resuming)."""
    import plait
    from ..parallel import SafetensorsSource, parallelize

    dtype = DTYPES[job.dtype]
    if _is_gpt(config):
        if checkpoint is not None:
            return parallelize(_on_meta(config), mesh, config=job.parallel, source=SafetensorsSource(checkpoint),
                               dtype=dtype)
        from ..models.gpt import GPT, init_parameters

        model = GPT(config)
        init_parameters(model, job.seed)
        return parallelize(model, mesh, config=job.parallel)
    if checkpoint is not None:
        return plait.from_pretrained(checkpoint, mesh, dtype, config=job.parallel)
    if job.model is not None:
        return plait.from_pretrained(job.model, mesh, dtype, config=job.parallel)
    from ..models.hf import _transformers

    torch.manual_seed(job.seed)
    model = _transformers().AutoModelForCausalLM.from_config(config).to(dtype)
    return parallelize(model, mesh, config=job.parallel)


def describe(config) -> dict:
    """What identifies the model beyond its tensor shapes (kept in a checkpoint's train state)."""
    if _is_gpt(config):
        data = config.to_dict()
        return {"gpt": {k: v for k, v in data.items() if k != "dtype"}}
    return {"model_type": getattr(config, "model_type", None)}


def check_same_model(checkpoint: Path, saved: Optional[dict], config) -> None:
    """ValueError naming what differs when a checkpoint's :func:`describe` (None: a checkpoint from
    before it was kept; its shapes were checked) is not the job model's."""
    mine = describe(config)
    if saved is None or saved == mine:
        return
    flat = lambda d: {f"{k}.{kk}": vv for k, v in d.items() for kk, vv in (v.items() if isinstance(v, dict)  # noqa: E731
                                                                             else [("", v)])}
    a, b = flat(saved), flat(mine)
    diffs = [f"{k.rstrip('.')}: checkpoint {a.get(k)!r}, job {b.get(k)!r}" for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k)]
    raise ValueError(f"{checkpoint}: a checkpoint of another model ({'; '.join(diffs)})")
