"""The shared-memory reduction kernels in one process: every SIMD path against PyTorch.

Each path (scalar, avx2, avx512 where the CPU has them) must give bitwise the same
result as the others, and the same as PyTorch's sequential fp32 (or native) arithmetic
rounded once, including every fp16 / bf16 bit pattern, ties, subnormals, inf and NaN.
"""
import pytest
import torch

from plait import _C

LEVELS = _C.shm_simd_levels()
CODES = _C.shm_dtypes
OPS = _C.shm_ops
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64, torch.int32: torch.int32, torch.int64: torch.int64}


def reduce(simd: str, srcs: list[torch.Tensor], op: str, out2: bool = False):
    """Run plait's kernel over equally long 1-D tensors; returns out (and out2)."""
    out = torch.empty_like(srcs[0])
    second = torch.empty_like(srcs[0]) if out2 else None
    _C.shm_reduce(simd, CODES[str(srcs[0].dtype).replace("torch.", "")], OPS[op], out.data_ptr(),
                  [s.data_ptr() for s in srcs], srcs[0].numel(), second.data_ptr() if out2 else 0)
    return (out, second) if out2 else out


def reference(srcs: list[torch.Tensor], op: str) -> torch.Tensor:
    """Left-to-right reduction in the accumulator type (fp32 for fp16/bf16), rounded once."""
    acc_dtype = torch.float32 if srcs[0].dtype in (torch.float16, torch.bfloat16) else srcs[0].dtype
    acc = srcs[0].to(acc_dtype)
    for s in srcs[1:]:
        x = s.to(acc_dtype)
        if op in ("sum", "avg"):
            acc = acc + x
        else:
            # acc > x ? acc : x, NaN in acc kept (the kernels' rule; equals torch.maximum off ties)
            pick = acc > x if op == "max" else acc < x
            acc = torch.where(pick | torch.isnan(acc), acc, x)
    if op == "avg":
        acc = acc / len(srcs)
    return acc.to(srcs[0].dtype)


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal bit patterns; NaNs only need to be NaN where PyTorch has NaN (payloads may differ)."""
    if got.dtype.is_floating_point:
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan), f"{what}: NaN positions differ"
        got, want = got[~nan], want[~nan]
    view = INT_VIEW[got.dtype]
    bad = (got.view(view) != want.view(view)).nonzero()
    assert bad.numel() == 0, (f"{what}: {bad.numel()} elements differ, first at {bad[0].item()}: "
                              f"{got[bad[0]].item()!r} vs {want[bad[0]].item()!r}")


def random_bits(dtype, n: int, gen: torch.Generator) -> torch.Tensor:
    bits = {2: 16, 4: 32}[torch.empty(0, dtype=dtype).element_size()]
    raw = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n,), generator=gen, dtype=torch.int64)
    return raw.to(INT_VIEW[dtype]).view(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_half_bit_pattern_rounds_like_torch(dtype):
    """All 65536 values, each reduced with a random partner and with two (3 sources)."""
    gen = torch.Generator().manual_seed(1)
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    partners = [random_bits(dtype, every.numel(), gen) for _ in range(2)]
    for srcs in ([every, partners[0]], [partners[1], every, partners[0]]):
        for op in OPS:
            results = [reduce(level, srcs, op) for level in LEVELS]
            for level, got in zip(LEVELS, results):
                assert_bitwise(got, reference(srcs, op), f"{dtype} {op} {level} ({len(srcs)} sources)")
                view = INT_VIEW[dtype]
                assert torch.equal(got.view(view), results[0].view(view)), f"{level} differs from scalar (NaN bits)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_random_bit_patterns(dtype):
    gen = torch.Generator().manual_seed(2)
    if dtype == torch.float32:
        srcs = [random_bits(dtype, 1 << 18, gen) for _ in range(3)]
    else:
        srcs = [torch.randn(1 << 16, generator=gen, dtype=dtype) * 1e3 for _ in range(3)]
        srcs[1][::7] = float("nan")
        srcs[2][::11] = float("inf")
    for op in OPS:
        for level in LEVELS:
            assert_bitwise(reduce(level, srcs, op), reference(srcs, op), f"{dtype} {op} {level}")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_integers_wrap_like_torch(dtype):
    gen = torch.Generator().manual_seed(3)
    info = torch.iinfo(dtype)
    srcs = [torch.randint(info.min, info.max, (5000,), generator=gen, dtype=dtype) for _ in range(4)]
    for op in ("sum", "max", "min"):
        for level in LEVELS:
            assert_bitwise(reduce(level, srcs, op), reference(srcs, op), f"{dtype} {op} {level}")
    with pytest.raises(ValueError, match="avg needs a floating-point dtype"):
        reduce("scalar", srcs, "avg")


def test_any_count_any_alignment_and_second_output():
    """Counts around the vector widths, sources and outputs at odd byte offsets, in-place use."""
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for count in (*range(0, 70), 1000, 4097):
            for shift in (0, 1):
                # views one element into a larger buffer: 2- or 4-byte aligned, never 32
                srcs = [(torch.randn(count + 1, generator=gen) * 8).to(dtype)[shift:shift + count] for _ in range(3)]
                want = reference(srcs, "sum")
                for level in LEVELS:
                    out, out2 = reduce(level, srcs, "sum", out2=True)
                    assert_bitwise(out, want, f"{dtype} count={count} shift={shift} {level}")
                    assert_bitwise(out2, want, f"{dtype} out2 count={count} {level}")
                    inplace = [s.clone() for s in srcs]
                    _C.shm_reduce(level, CODES[str(dtype)[6:]], OPS["sum"], inplace[1].data_ptr(),
                                  [s.data_ptr() for s in inplace], count)
                    assert_bitwise(inplace[1], want, f"{dtype} in place count={count} {level}")


def test_simd_override_is_checked():
    with pytest.raises(ValueError, match="unknown SIMD level"):
        reduce("sse9", [torch.ones(4)], "sum")
    if "avx512" not in LEVELS:
        with pytest.raises(ValueError, match="not supported by this CPU"):
            reduce("avx512", [torch.ones(4)], "sum")
    assert LEVELS[0] == "scalar"
