"""plait.parallel: make any plain model data-, pipeline- and tensor-parallel from a plan.

    model = plait.parallelize(plain_model, mesh, plan=None)   # -> plait.ParallelModel

See :mod:`plait.parallel.plan` for plans and styles, :mod:`plait.parallel.stage` for
the pipeline split, :mod:`plait.parallel.model` for :class:`ParallelModel`.
"""
from ..heads import HeadLayout
from .apply import check_plan
from .families import FAMILIES, PLANS, check_config, family, for_model, gpt2_plan, llama_plan, translate_hf_plan
from .model import ParallelModel, parallelize
from .plan import STYLES, Plan
from .shard import SafetensorsSource, ShardSpec, StateDictSource

__all__ = ["parallelize", "ParallelModel", "Plan", "STYLES", "FAMILIES", "check_plan", "check_config", "family",
           "for_model", "PLANS",
           "llama_plan", "gpt2_plan", "translate_hf_plan", "HeadLayout", "ShardSpec", "StateDictSource",
           "SafetensorsSource"]
