"""Launch configuration: autotune candidates kept next to the kernels, SM counts, modes.

Hopper candidates favour 128x128..128x256 tiles with 3-4 stages (wgmma wants
M=64 multiples per warpgroup and deep K pipelining); the interpreter gets one
small tile so CPU tests stay fast (autotune with one config does not benchmark).
"""
from __future__ import annotations

import os

import torch
import triton

ACT_CODES = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "swiglu": 5}


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _config(bm: int, bn: int, bk: int, group: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": group}, num_warps=warps, num_stages=stages)


HOPPER_CONFIGS = [
    _config(128, 256, 64, 8, 8, 3),
    _config(256, 128, 64, 8, 8, 3),
    _config(128, 128, 64, 8, 8, 4),
    _config(128, 128, 64, 8, 4, 4),
    _config(128, 64, 64, 8, 4, 4),
    _config(64, 128, 64, 8, 4, 4),
    _config(64, 64, 64, 8, 4, 4),
    _config(64, 256, 32, 8, 4, 4),
]
INTERPRETER_CONFIGS = [_config(32, 32, 32, 4, 4, 1)]


def gemm_configs() -> list[triton.Config]:
    """Autotune candidates for the current mode."""
    return INTERPRETER_CONFIGS if interpreting() else HOPPER_CONFIGS


def signal_config() -> dict:
    """One fixed config for the signalling GEMMs: autotuning would re-run them and
    publish flags twice, so they are never autotuned."""
    if interpreting():
        return dict(BM=32, BN=32, BK=32, GROUP_M=4, num_warps=4, num_stages=1)
    return dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3)


def num_programs(device: torch.device, tiles: int) -> int:
    """Persistent grid size: one program per SM (4 in the interpreter), never more than tiles."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4
    return max(1, min(sms, tiles))
