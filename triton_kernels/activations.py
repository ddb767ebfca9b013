"""Activations and their derivatives as Triton device functions, selected by a constexpr code.

Codes (``config.ACT_CODES``): 0 none, 1 relu, 2 gelu (erf), 3 gelu_tanh, 4 silu;
swiglu (5) is two accumulators combined in the GEMM epilogue, not a function
of one value. Math in fp32. tanh is written with exp so the same code runs in
the interpreter and on the GPU.
"""
import triton
import triton.language as tl

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_GELU_TANH_C = 0.7978845608028654  # sqrt(2/pi)


@triton.jit
def _tanh(x):
    x = tl.minimum(tl.maximum(x, -15.0), 15.0)  # tanh is +-1 to fp32 precision there; exp stays finite
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def activate(z, ACT: tl.constexpr):
    """act(z) for ACT in 0..4 (fp32 in, fp32 out)."""
    if ACT == 1:
        return tl.maximum(z, 0.0)
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    elif ACT == 3:
        return 0.5 * z * (1.0 + _tanh(_GELU_TANH_C * (z + 0.044715 * z * z * z)))
    elif ACT == 4:
        return z * tl.sigmoid(z)
    else:
        return z


@triton.jit
def activate_grad(z, ACT: tl.constexpr):
    """d act(z) / dz for ACT in 0..4 (fp32)."""
    if ACT == 1:
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        return 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACT == 3:
        inner = _GELU_TANH_C * (z + 0.044715 * z * z * z)
        t = _tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _GELU_TANH_C * (1.0 + 3.0 * 0.044715 * z * z)
    elif ACT == 4:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    else:
        return z * 0.0 + 1.0
