"""Inference for plait's parallel models: KV cache, continuous batching, sampling, ``plait generate``
and ``plait serve`` (an OpenAI-compatible HTTP server over DP replicas of a PP x TP layout).

Importing this package needs only torch; the server's extras (fastapi, uvicorn,
prometheus-client) are imported by :mod:`plait.serve.server` alone.
"""
from .engine import Completion, Engine
from .sampling import SamplingParams
from .scheduler import Event, QueueFull, Request, Scheduler
from .text import TextStream, load_tokenizer

__all__ = ["Completion", "Engine", "Event", "QueueFull", "Request", "SamplingParams", "Scheduler", "TextStream",
           "load_tokenizer"]
