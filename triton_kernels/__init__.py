"""plait.kernels: Triton GEMMs with fused epilogues and their comm-aware variants.

Installed as ``plait.kernels`` (setup.py maps ``triton_kernels/`` there). Triton is a
dependency on Linux x86_64 only, so callers check ``HAVE_TRITON`` before using a kernel
and fall back to torch, with a reason, when it is False. On a CPU-only machine the
kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` set before import).

- :func:`fused_linear`: ``activation(x @ W.T + b) + residual`` with autograd.
- :func:`producer_linear` / :func:`consumer_linear`: GEMMs that publish or await
  per-chunk flags, the building blocks of ``overlap="fused"``.
"""

try:
    import triton  # noqa: F401
except ImportError:
    HAVE_TRITON = False
else:
    HAVE_TRITON = True

__all__ = ["HAVE_TRITON"]

if HAVE_TRITON:
    from .linear import FusedLinearFunction, fused_linear
    from .signals import ChunkSignals, SignalTimeoutError, consumer_linear, producer_linear

    __all__ += ["fused_linear", "FusedLinearFunction", "producer_linear", "consumer_linear", "ChunkSignals",
                "SignalTimeoutError"]
