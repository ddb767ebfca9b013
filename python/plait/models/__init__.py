"""plait.models: a reference GPT built from plait's parallel layers, split into pipeline chunks."""
from .checkpoint import (export_full_state_dict, import_full_state_dict, load_checkpoint, read_meta,
                         save_checkpoint)
from .config import GPTConfig
from .train import StepRecord, TrainJob, synthetic_batch, train
from .gpt import GPT, GPTStage, build_stages, full_state_dict, gpt_loss, gpt_plan, init_parameters, partition

__all__ = ["GPT", "gpt_plan", "GPTConfig", "GPTStage", "build_stages", "partition", "init_parameters", "gpt_loss", "full_state_dict",
           "save_checkpoint", "load_checkpoint", "read_meta", "export_full_state_dict", "import_full_state_dict",
           "TrainJob", "StepRecord", "train", "synthetic_batch"]
