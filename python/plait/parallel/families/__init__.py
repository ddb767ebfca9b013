"""One module per model family; this registry answers "which family, which plan" for a model.

``for_model(model)`` picks, in order: the model's own plan (``model.plait_plan()``), plait's plan
for its architecture (``config.model_type``), else a plan translated from the config's
``base_model_tp_plan`` (a Llama-like decoder: ``base_model_pp_plan`` and a rotary embedding),
else a ValueError listing what is supported and how to pass a plan by hand. A translated plan
is something to pass explicitly: :func:`check_config` (which ``parallelize`` and
``from_pretrained`` call) refuses a model type no family owns unless the caller chose the plan,
since such a config may carry fields no family reads.

========  =================================  ==============================================
family    module                             model types
========  =================================  ==============================================
llama     :mod:`.llama`                      llama, mistral, qwen2, qwen3 (+ plans passed in)
gpt2      :mod:`.gpt2`                       gpt2
gemma2    :mod:`.gemma2`                     gemma2
plait     :mod:`.plait_gpt`                  plait's reference GPT
========  =================================  ==============================================
"""
from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from typing import Callable, Optional

from torch import nn

from ..plan import Plan
from .base import NOT_MATH, Family, Field, HFDecoder
from .gpt2 import gpt2_plan
from .llama import llama_plan, translate_hf_plan
from .plait_gpt import gpt_plan


def _discover() -> dict[str, Family]:
    """Every concrete Family subclass defined in this package's modules (adding a family is adding a module)."""
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):        # __main__: the docs generator
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Family) and not inspect.isabstract(cls) and cls.__module__ == module.__name__:
                found[cls.name] = cls()
    return found


FAMILIES: dict[str, Family] = _discover()
BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES.values() for t in f.model_types}

# model_type -> its shipped plan (plait.plans.PLANS)
PLANS: dict[str, Callable[[], Plan]] = {t: functools.partial(f.shipped_plan, t) for t, f in BY_MODEL_TYPE.items()}


def family(name: str) -> Family:
    """The family called ``name`` (a Plan's ``family``)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; plait has {sorted(FAMILIES)}") from None


def family_of_config(config, plan_family: Optional[str] = None) -> Family:
    """The family of a transformers config (by ``model_type``); for another model type, the family of the plan
    the caller chose (``plan_family``), else a ValueError naming the model type and what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[model_type]
    if plan_family is not None:       # the caller's own plan: its family's fields are checked, nothing more
        return family(plan_family)
    raise ValueError(
        f"plait has no model family for model_type={model_type!r}: it computes exactly what transformers computes "
        f"for {sorted(BY_MODEL_TYPE)} and plait's GPT. Other decoders, Llama-like ones with a transformers TP plan "
        f"included, can carry config fields a family would not see (granite's embedding_multiplier, cohere's "
        f"logit_scale, gemma's embedding scale), so plait does not guess. To run one anyway, unchecked, pass a plan: "
        f"plan=plait.parallel.translate_hf_plan(model) (or your own Plan) to plait.parallelize or "
        f"plait.from_pretrained (from Python: the plait commands take no plan)")


def check_config(config, plan_family: Optional[str] = None) -> None:
    """Refuse, naming the field, a transformers config whose math plait does not support (before loading);
    ``plan_family``: the family of a plan the caller passed (see :func:`family_of_config`)."""
    family_of_config(config, plan_family).check_config(config)


def for_model(model: nn.Module) -> Plan:
    """The plan for ``model``: its own, plait's for its architecture, else a translated transformers plan."""
    plait_plan = getattr(model, "plait_plan", None)
    if callable(plait_plan):
        return plait_plan()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[model_type].shipped_plan(model_type)
    try:
        return translate_hf_plan(model)
    except ValueError as err:
        reason = str(err)
    raise ValueError(
        f"no plan for {type(model).__name__} (model_type={model_type!r}): {reason}. plait ships plans for "
        f"{sorted(PLANS)} and plait's GPT, and translates transformers' base_model_tp_plan for Llama-like "
        f"decoders. Pass one by hand: plait.parallelize(model, mesh, plan=plait.plans.Plan(name=..., "
        f"family='llama', styles={{'model.layers.*.self_attn.q_proj': 'colwise_q', ...}}, embed=..., layers=..., "
        f"norm=..., head=...)); print(plait.plans.llama_plan()) shows a complete example")


def fields_markdown() -> str:
    """docs/model-fields.md: every config field that changes the math, per family, and what plait does."""
    lines = ["# Model config fields", "",
             "Generated by `python -m plait.parallel.families` from the family modules in",
             "`python/plait/parallel/families/`; `tests/test_fidelity.py` checks it is current and that every",
             "field of each supported transformers config class is listed here or is bookkeeping",
             "(ids, labels, generation defaults). *Honoured* fields are tested against transformers",
             "(`tests/test_fidelity.py`); a refused value is an error naming the field, raised before",
             "any weights are read or process group is made.", ""]
    for fam in FAMILIES.values():
        if not fam.fields:
            continue
        lines += [f"## {fam.name} ({', '.join(fam.model_types)})", "", "| field | status | what plait does |",
                  "|---|---|---|"]
        lines += [f"| `{f.name}` | {f.status} | {f.how} |" for f in fam.fields]
        lines.append("")
    return "\n".join(lines)


__all__ = ["FAMILIES", "BY_MODEL_TYPE", "PLANS", "Family", "HFDecoder", "Field", "NOT_MATH", "family",
           "family_of_config", "check_config", "for_model", "llama_plan", "gpt2_plan", "gpt_plan",
           "translate_hf_plan", "fields_markdown"]
