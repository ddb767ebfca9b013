"""``fused_linear``: ``activation(x @ weight.T + bias) + residual`` in one Triton GEMM, with autograd.

Forward stores the pre-activation when a gradient will be needed (one extra
write of the output's size; recomputing it in backward would cost a third
GEMM). Backward runs two GEMMs with ``act'`` fused into their A-operand load:

    dZ = dY * act'(Z)            (never materialized, except for swiglu)
    dX = dZ @ W                  input gradient
    dW = dZ^T @ X, db = sum dZ   weight gradient, bias gradient as row sums in the same kernel

For swiglu (``weight`` holds gate rows then up rows, ``[2N, K]``, output
``[..., N]``) dZ needs two values per element, so a small elementwise kernel
writes it first.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .config import ACT_CODES, interpreting
from .gemm import launch_gemm

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _swiglu_grad_kernel(grad_ptr, pre_ptr, dz_ptr, rows, n, BLOCK: tl.constexpr):
    """dZ[:, :n] = dY * u * silu'(g), dZ[:, n:] = dY * silu(g), with Z = [g, u] row-major [rows, 2n]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)   # int64: rows * 2n may pass 2**31
    ok = offs < rows * n
    row, col = offs // n, offs % n
    dy = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(pre_ptr + row * 2 * n + col, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(pre_ptr + row * 2 * n + n + col, mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dz_ptr + row * 2 * n + col, (dy * u * s * (1.0 + g * (1.0 - s))).to(dz_ptr.dtype.element_ty), mask=ok)
    tl.store(dz_ptr + row * 2 * n + n + col, (dy * g * s).to(dz_ptr.dtype.element_ty), mask=ok)


def check_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      activation: Optional[str], residual: Optional[torch.Tensor],
                      out: Optional[torch.Tensor]) -> int:
    """Validate ``fused_linear``'s arguments; return the output feature count N."""
    if not (activation is None or isinstance(activation, str)) or activation not in ACT_CODES:
        raise ValueError(f"unknown activation {activation!r}; use one of {list(ACT_CODES)}")
    if x.dtype not in DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share one dtype of {DTYPES}, got {x.dtype} and {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device}, weight on {weight.device}")
    _check_runnable_device(x.device)
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x [..., K] and weight [N, K] do not fit: x {list(x.shape)}, weight {list(weight.shape)}")
    rows = weight.shape[0]
    if activation == "swiglu" and rows % 2:
        raise ValueError(f"swiglu needs weight rows = 2 * N (gate then up), got {rows}")
    n = rows // 2 if activation == "swiglu" else rows
    if bias is not None and (bias.shape != (rows,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be [{rows}] of {x.dtype} on {x.device}, got {list(bias.shape)} {bias.dtype}")
    out_shape = (*x.shape[:-1], n)
    for name, t in (("residual", residual), ("out", out)):
        if t is not None and (tuple(t.shape) != out_shape or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} must be {list(out_shape)} of {x.dtype} on {x.device}, got "
                             f"{list(t.shape)} {t.dtype} on {t.device}")
    if out is not None:
        for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
            if t is not None and _may_overlap(out, t):
                raise ValueError(f"out shares memory with {name}: tiles would overwrite inputs other tiles still "
                                 f"read (and GPU autotuning re-runs the kernel); pass a separate out")
    return n


def _check_runnable_device(device: torch.device) -> None:
    """Triton runs CUDA tensors, and CPU tensors only on its interpreter; anything else (a CPU tensor
    with compiled Triton, a meta tensor) would fail deep inside the launch, so say so here."""
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return
    hint = " (CPU tensors need TRITON_INTERPRET=1 set before triton is imported)" if device.type == "cpu" else ""
    raise ValueError(f"plait.kernels cannot run on {device}{hint}; use torch ops there")


def _may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` may share memory: same storage and intersecting address ranges.
    Conservative: interleaved views that touch no common element also count."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def flatten_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` [..., F] as [rows, F] (a view where possible). The row count is spelled out because
    ``reshape(-1, 0)`` is ambiguous and raises for K = 0 or N = 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def rows_view(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t`` [..., F] as a [rows, F] view sharing its memory, or None when its strides allow no such
    view (a kernel writing into a reshaped copy would leave ``t`` unwritten)."""
    try:
        return t.view(math.prod(t.shape[:-1]), t.shape[-1])
    except RuntimeError:
        return None


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on the gradients of :class:`FusedLinearFunction` that raises if differentiated.

    Its backward kernels record no graph, so under ``create_graph=True`` the
    gradients would look constant and a second derivative would silently lose
    fused_linear's terms. (``once_differentiable`` does not help: it only looks at
    whether the incoming gradient requires grad, not the saved inputs.) The
    first ``num_anchors`` arguments are the tensors the gradients depend on that
    require grad; taking them as inputs links every one of them to this node.
    """

    @staticmethod
    def forward(ctx, num_anchors, *tensors):
        return tuple(g.clone() for g in tensors[num_anchors:])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("fused_linear has no second derivative (its backward kernels record no graph); "
                           "use F.linear and the activation where higher-order gradients are needed")


def _first_order_only(depends_on: tuple, grads: tuple) -> tuple:
    """``grads`` unchanged, except under ``create_graph=True`` when something in ``depends_on``
    requires grad: then each tensor comes back through :class:`_FirstOrderOnly`."""
    anchors = [t for t in depends_on if t is not None and t.requires_grad]
    present = [g for g in grads if g is not None]
    if not torch.is_grad_enabled() or not anchors or not present:
        return grads
    wrapped = iter(_FirstOrderOnly.apply(len(anchors), *anchors, *present))
    return tuple(next(wrapped) if g is not None else None for g in grads)


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
             activation: Optional[str], out: Optional[torch.Tensor], keep_pre: bool):
    """Run the forward GEMM; return ``(y, pre)``, ``pre`` the pre-activation [M, weight rows] when
    ``keep_pre`` and there is an activation (backward needs it), else None."""
    n = weight.shape[0] // 2 if activation == "swiglu" else weight.shape[0]
    x2 = flatten_rows(x)
    y = out if out is not None else torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    y2 = rows_view(y)
    copy_back = y2 is None  # an out= whose strides do not flatten: compute into a buffer, then copy
    if copy_back:
        y2 = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    pre = (torch.empty(x2.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
           if keep_pre and activation is not None else None)
    launch_gemm(x2, weight.t(), y2, act=ACT_CODES[activation], swiglu=activation == "swiglu",
                bias=bias, residual=flatten_rows(residual) if residual is not None else None, pre=pre)
    if copy_back:
        y.copy_(y2.view(y.shape))
    return y, pre


class FusedLinearFunction(torch.autograd.Function):
    """Autograd for :func:`fused_linear` (x, weight, bias, residual differentiable)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, activation, out):
        y, pre = _forward(x, weight, bias, residual, activation, out, keep_pre=any(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(x, weight, pre)  # x, not its flattened copy: it anchors _first_order_only
        ctx.activation, ctx.has_bias = activation, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        grad_res = grad if ctx.needs_input_grad[3] else None
        if not any(ctx.needs_input_grad[:3]):
            return None, None, None, grad_res, None, None  # only the residual: forward saved no pre-activation
        x, weight, pre = ctx.saved_tensors
        act = ctx.activation
        g2 = flatten_rows(grad).contiguous()
        if act == "swiglu":
            dz = torch.empty_like(pre)
            rows, n = g2.shape
            block = 1024
            _swiglu_grad_kernel[(triton.cdiv(rows * n, block),)](g2, pre, dz, rows, n, BLOCK=block)
            a, z, code = dz, None, 0
        else:
            a, z, code = g2, pre, ACT_CODES[act] if act is not None else 0
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty(a.shape[0], weight.shape[1], dtype=x.dtype, device=x.device)
            launch_gemm(a, weight, grad_x, prologue_z=z, prologue_act=code)
            grad_x = grad_x.view(x.shape)
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1] or want_b:
            grad_w = torch.empty_like(weight)
            row_sums = torch.empty(weight.shape[0], dtype=torch.float32, device=x.device) if want_b else None
            launch_gemm(a.t(), flatten_rows(x), grad_w, prologue_z=z.t() if z is not None else None,
                        prologue_act=code, rowsum=row_sums)
            grad_b = row_sums.to(weight.dtype) if want_b else None
            grad_w = grad_w if ctx.needs_input_grad[1] else None
        grad_x, grad_w, grad_b = _first_order_only((x, weight, grad), (grad_x, grad_w, grad_b))
        return grad_x, grad_w, grad_b, grad_res, None, None


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 activation: Optional[str] = None, residual: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``activation(x @ weight.T + bias) + residual`` in one kernel; differentiable.

    ``x`` [..., K], ``weight`` [N, K] (``nn.Linear`` layout; [2N, K] gate-then-up
    for ``"swiglu"``), ``bias`` [N] (or [2N]), ``residual`` [..., N]; bf16, fp16
    or fp32, fp32 accumulation, output in ``x.dtype``. ``activation``: None,
    "relu", "gelu" (erf), "gelu_tanh", "silu", "swiglu". ``out`` receives the
    result when given (not with autograd; any strides; it must not share memory
    with an input, the residual included). Raises ValueError on bad shapes,
    dtypes, devices or overlaps.
    """
    check_linear_args(x, weight, bias, activation, residual, out)
    if out is not None and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, residual, out)):
        raise ValueError("fused_linear(out=...) cannot be used with autograd; drop out= or use torch.no_grad()")
    if not torch.is_grad_enabled():  # no graph: skip autograd, whose needs_input_grad would still keep pre
        return _forward(x, weight, bias, residual, activation, out, keep_pre=False)[0]
    return FusedLinearFunction.apply(x, weight, bias, residual, activation, out)
