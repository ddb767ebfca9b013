"""float64 references for the fused linear kernels and a relative-error check."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_linear(x, weight, bias, activation, residual):
    """``activation(x @ weight.T + bias) + residual`` in float64 with plain torch ops."""
    z = x.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if activation == "swiglu":
        n = weight.shape[0] // 2
        y = F.silu(z[..., :n]) * z[..., n:]
    elif activation == "gelu_tanh":
        y = F.gelu(z, approximate="tanh")
    elif activation is None:
        y = z
    else:
        y = getattr(F, activation)(z)
    return y if residual is None else y + residual.double()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||``; NaN anywhere in ``got`` gives inf, so NaN never passes."""
    got64 = got.double()
    if not torch.isfinite(got64).all():
        return float("inf")
    denom = want.double().norm().item()
    return (got64 - want.double()).norm().item() / (denom if denom > 0 else 1.0)
