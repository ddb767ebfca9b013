"""plait.models: plain models (the reference GPT, no parallel code) and Hugging Face loading and saving."""
from .config import GPTConfig
from .gpt import GPT, gpt_plan, init_parameters

__all__ = ["GPT", "gpt_plan", "GPTConfig", "init_parameters"]
