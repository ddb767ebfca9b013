"""One persistent Triton GEMM, ``C = epilogue(prologue(A) @ B)``, and its launcher.

Every plait GEMM is this kernel with different constexpr switches:

==========================  ===========================================================
switch                      effect
==========================  ===========================================================
ACT                         epilogue activation (codes in ``config.ACT_CODES``)
SWIGLU                      B holds gate columns then up columns ``up_offset`` apart;
                            C = silu(A@Bg) * (A@Bu)
HAS_BIAS / HAS_RES          add a bias row before the activation / a residual after it
STORE_PRE                   also store the pre-activation (saved for backward)
PROLOGUE_ACT                A is replaced by ``A * act'(Z)`` as tiles load (backward of
                            an activation, fused into the input- and weight-gradient GEMMs)
ROWSUM                      also store the row sums of the (prologued) A: the bias
                            gradient, for free, inside the weight-gradient GEMM
PUBLISH                     producer: after each tile, count it towards its row chunk;
                            the last tile of a chunk sets ``flags[chunk] = epoch`` (release)
AWAIT                       consumer: before loading A rows, wait (acquire, bounded spins)
                            until ``ready[chunk] >= epoch`` for every chunk the tile reads;
                            on timeout write ``chunk + 1`` to ``error`` and go on
==========================  ===========================================================

Tiles are visited in grouped order (GROUP_M rows of tiles at a time, for L2
reuse) by a persistent grid of one program per SM; row chunks therefore
complete roughly in sequence, which is what the producer needs. Accumulation
is fp32; fp32 operands use IEEE products unless TF32 is allowed by torch.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .activations import activate, activate_grad
from .config import gemm_configs, num_programs, signal_config


@triton.jit
def _tile_position(tile, num_m, num_n, GROUP_M: tl.constexpr):
    width = GROUP_M * num_n
    first_m = (tile // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % width) % size_m, (tile % width) // size_m


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _await_rows(ready_ptr, error_ptr, row_start, row_end, rows_per_chunk, epoch, max_spins):
    for chunk in range(row_start // rows_per_chunk, (row_end - 1) // rows_per_chunk + 1):
        seen = tl.atomic_add(ready_ptr + chunk, 0, sem="acquire", scope="sys")
        # After one timeout the round is lost: later tiles do not spin their whole bound again.
        spins = tl.where(tl.load(error_ptr, volatile=True) != 0, max_spins, 0)
        while (seen < epoch) & (spins < max_spins):
            seen = tl.atomic_add(ready_ptr + chunk, 0, sem="acquire", scope="sys")
            spins += 1
        if seen < epoch:
            tl.atomic_cas(error_ptr, 0, chunk + 1)   # the first chunk that timed out is reported


@triton.jit
def _publish_rows(counter_ptr, flag_ptr, row_start, row_end, rows_per_chunk, M, num_n, epoch,
                  BM: tl.constexpr):
    for chunk in range(row_start // rows_per_chunk, (row_end - 1) // rows_per_chunk + 1):
        chunk_end = tl.minimum(M, (chunk + 1) * rows_per_chunk)
        tiles = num_n * ((chunk_end - 1) // BM - (chunk * rows_per_chunk) // BM + 1)
        # acq_rel: the tile that completes the chunk must acquire the other tiles' releases, so that
        # its system-scope release of the flag covers their stores too.
        done = tl.atomic_add(counter_ptr + chunk, 1, sem="acq_rel", scope="gpu") + 1
        if done == tiles:
            tl.atomic_xchg(flag_ptr + chunk, epoch, sem="release", scope="sys")


# epoch, rows_per_chunk and max_spins change between calls: specializing on their values (1, 16,
# divisibility) would recompile the kernel as the epoch grows, while a peer waits on its flags.
@triton.jit(do_not_specialize=["epoch", "rows_per_chunk", "max_spins"])
def gemm_kernel(a_ptr, z_ptr, b_ptr, c_ptr, bias_ptr, res_ptr, pre_ptr, rowsum_ptr,
                sig_a_ptr, sig_b_ptr, error_ptr,
                M, N, K,
                stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                stride_rm, stride_rn, stride_pm, stride_pn, stride_bias,
                up_offset, epoch, rows_per_chunk, max_spins,
                ACT: tl.constexpr, PROLOGUE_ACT: tl.constexpr, SWIGLU: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, STORE_PRE: tl.constexpr,
                ROWSUM: tl.constexpr, AWAIT: tl.constexpr, PUBLISH: tl.constexpr, IEEE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    if ROWSUM or PUBLISH:
        num_n = tl.maximum(num_n, 1)  # row sums and chunk flags need a tile per row block even if C has no columns
    for tile in range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        pid_m, pid_n = _tile_position(tile, num_m, num_n, GROUP_M)
        # int64 indices: offsets such as row * stride reach past 2**31 elements at long sequences
        # (65536 tokens x a 57344-wide SwiGLU pre-activation is 3.8e9)
        rm = pid_m * BM + tl.arange(0, BM).to(tl.int64)
        rn = pid_n * BN + tl.arange(0, BN).to(tl.int64)
        m_ok = rm < M
        n_ok = rn < N
        if AWAIT:
            _await_rows(sig_a_ptr, error_ptr, pid_m * BM, tl.minimum(M, pid_m * BM + BM), rows_per_chunk,
                        epoch, max_spins)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        row_sum = tl.zeros((BM,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK).to(tl.int64)
            k_ok = rk < K
            a_off = rm[:, None] * stride_am + rk[None, :] * stride_ak
            a_mask = m_ok[:, None] & k_ok[None, :]
            a = tl.load(a_ptr + a_off, mask=a_mask, other=0.0)
            if PROLOGUE_ACT != 0:
                z = tl.load(z_ptr + a_off, mask=a_mask, other=0.0).to(tl.float32)
                a32 = a.to(tl.float32) * activate_grad(z, PROLOGUE_ACT)
                if ROWSUM:
                    row_sum += tl.sum(a32, axis=1)
                a = a32.to(a_ptr.dtype.element_ty)
            elif ROWSUM:
                row_sum += tl.sum(a.to(tl.float32), axis=1)
            b_off = rk[:, None] * stride_bk + rn[None, :] * stride_bn
            b_mask = k_ok[:, None] & n_ok[None, :]
            acc = _dot(a, tl.load(b_ptr + b_off, mask=b_mask, other=0.0), acc, IEEE)
            if SWIGLU:
                b_up = tl.load(b_ptr + b_off + up_offset * stride_bn, mask=b_mask, other=0.0)
                acc_up = _dot(a, b_up, acc_up, IEEE)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn * stride_bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if SWIGLU:
                acc_up += tl.load(bias_ptr + (up_offset + rn) * stride_bias, mask=n_ok,
                                  other=0.0).to(tl.float32)[None, :]
        c_mask = m_ok[:, None] & n_ok[None, :]
        if STORE_PRE:
            p_off = rm[:, None] * stride_pm + rn[None, :] * stride_pn
            tl.store(pre_ptr + p_off, acc.to(pre_ptr.dtype.element_ty), mask=c_mask)
            if SWIGLU:
                tl.store(pre_ptr + p_off + up_offset * stride_pn, acc_up.to(pre_ptr.dtype.element_ty), mask=c_mask)
        if SWIGLU:
            out = acc * tl.sigmoid(acc) * acc_up
        else:
            out = activate(acc, ACT)
        if HAS_RES:
            res = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :] * stride_rn, mask=c_mask, other=0.0)
            out += res.to(tl.float32)
        tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, out.to(c_ptr.dtype.element_ty),
                 mask=c_mask)
        if ROWSUM:
            if pid_n == 0:
                tl.store(rowsum_ptr + rm, row_sum, mask=m_ok)
        if PUBLISH:
            tl.debug_barrier()  # every thread's stores happen before the release below
            _publish_rows(sig_a_ptr, sig_b_ptr, pid_m * BM, tl.minimum(M, pid_m * BM + BM), rows_per_chunk,
                          M, num_n, epoch, BM)


_tuned_gemm = triton.autotune(configs=gemm_configs(),
                              key=["M", "N", "K", "ACT", "PROLOGUE_ACT", "SWIGLU", "ROWSUM"])(gemm_kernel)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, and the same element addressing: strides of dimensions of size 1 never
    move the address, and an empty tensor has no addresses, so only the others must agree
    (``contiguous()`` keeps odd strides in both cases)."""
    if a.shape != b.shape:
        return False
    return a.numel() == 0 or all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def _strides(t: Optional[torch.Tensor]) -> tuple[int, int]:
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def launch_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, act: int = 0, swiglu: bool = False,
                bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                pre: Optional[torch.Tensor] = None, prologue_z: Optional[torch.Tensor] = None,
                prologue_act: int = 0, rowsum: Optional[torch.Tensor] = None,
                publish: Optional[tuple] = None, await_: Optional[tuple] = None,
                programs: Optional[int] = None) -> torch.Tensor:
    """Run the kernel on 2-D views: ``a`` [M, K], ``b`` [K, N or 2N with swiglu], ``c`` [M, N].

    ``prologue_z`` must have ``a``'s shape and strides. ``publish`` is
    ``(counters, flags, epoch, rows_per_chunk)``, ``await_`` is
    ``(ready, error, epoch, rows_per_chunk, max_spins)``; signalling launches
    use one fixed tile config (autotuning would run them twice), and
    ``programs`` caps their persistent grid (a consumer spinning on every SM
    would starve its producer). Callers validate shapes; this only launches.
    """
    m, k = a.shape
    n = c.shape[1]
    if prologue_z is not None and not _same_layout(prologue_z, a):
        raise ValueError("prologue_z must match a's shape and strides")
    dummy = c
    sig_a = sig_b = error = dummy
    epoch, rows_per_chunk, max_spins = 0, 1, 0
    if publish is not None:
        sig_a, sig_b, epoch, rows_per_chunk = publish
    if await_ is not None:
        sig_a, error, epoch, rows_per_chunk, max_spins = await_
    ieee = a.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    args = (a, prologue_z if prologue_z is not None else dummy, b, c,
            bias if bias is not None else dummy, residual if residual is not None else dummy,
            pre if pre is not None else dummy, rowsum if rowsum is not None else dummy,
            sig_a, sig_b, error, m, n, k, *_strides(a), *_strides(b), *_strides(c), *_strides(residual),
            *_strides(pre), bias.stride(0) if bias is not None else 0, n if swiglu else 0, epoch,
            rows_per_chunk, max_spins)
    flags = dict(ACT=act, PROLOGUE_ACT=prologue_act, SWIGLU=swiglu, HAS_BIAS=bias is not None,
                 HAS_RES=residual is not None, STORE_PRE=pre is not None, ROWSUM=rowsum is not None,
                 AWAIT=await_ is not None, PUBLISH=publish is not None, IEEE=ieee)
    if publish is None and await_ is None:
        grid = lambda meta: (num_programs(c.device, triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"])),)
        _tuned_gemm[grid](*args, **flags)
    else:
        cfg = signal_config()
        tiles = triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"])
        grid = (min(programs, tiles) if programs else num_programs(c.device, tiles),)
        gemm_kernel[grid](*args, **flags, **cfg)
    return c
