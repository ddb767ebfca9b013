"""Test-wide defaults, set before any test module imports torch or triton.

- A short collective timeout, so a broken test fails instead of hanging.
- Without a CUDA GPU, Triton kernels run on the interpreter (it must be chosen
  before triton is imported).
"""
import os

os.environ.setdefault("PLAIT_TIMEOUT_S", "60")

import torch  # noqa: E402  (torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
