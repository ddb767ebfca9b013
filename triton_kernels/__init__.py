"""plait.kernels: Triton GEMMs with fused epilogues and their comm-aware variants.

Installed as ``plait.kernels`` (setup.py maps ``triton_kernels/`` there). Triton is a
dependency on Linux x86_64 only, so callers check ``HAVE_TRITON`` before using a kernel
and fall back to torch, with a reason, when it is False. On a CPU-only machine the
kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` set before import).
"""

try:
    import triton  # noqa: F401
except ImportError:
    HAVE_TRITON = False
else:
    HAVE_TRITON = True

__all__ = ["HAVE_TRITON"]
