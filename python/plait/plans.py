"""``plait.plans``: the plans plait ships and how one is chosen (an alias of plait.parallel's).

    plan = plait.plans.for_model(model)     # or plait.plans.llama_plan(), gpt2_plan(), Plan(...)
    print(plan); plan.to_json()
"""
from .parallel.families import FAMILIES, PLANS, for_model, gpt2_plan, llama_plan, translate_hf_plan
from .parallel.plan import STYLES, Plan

__all__ = ["Plan", "STYLES", "FAMILIES", "PLANS", "for_model", "llama_plan", "gpt2_plan", "translate_hf_plan"]
