"""plait.models: plain models (the reference GPT, no parallel code) and Hugging Face loading and saving."""
from .config import GPTConfig
from .gpt import GPT, GPTStage, build_stages, full_state_dict, gpt_loss, gpt_plan, init_parameters, partition

__all__ = ["GPT", "gpt_plan", "GPTConfig", "GPTStage", "build_stages", "partition", "init_parameters", "gpt_loss",
           "full_state_dict"]
