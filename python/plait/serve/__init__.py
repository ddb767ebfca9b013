"""Inference for plait's parallel models: KV cache, continuous batching, sampling, ``plait generate``
and ``plait serve`` (an OpenAI-compatible HTTP server over DP replicas of a PP x TP layout).

Names are imported on first use, so ``plait generate --help`` starts without torch; the
server's extras (fastapi, uvicorn, prometheus-client) are imported by :mod:`plait.serve.server` alone.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY_NAMES = {
    "Completion": "engine", "Engine": "engine", "SamplingParams": "sampling", "Event": "scheduler",
    "QueueFull": "scheduler", "Request": "scheduler", "Scheduler": "scheduler", "TextStream": "text",
    "load_tokenizer": "text",
}
__all__ = sorted(_LAZY_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module 'plait.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    globals()[name] = value
    return value
