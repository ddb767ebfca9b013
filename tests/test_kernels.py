"""plait.kernels on the Triton interpreter (CPU): fused_linear forward/backward, signals.

Every buffer torch allocates uninitialized is poisoned with NaN (deterministic
mode fills ``torch.empty``), so an element a kernel forgets to write fails.
bf16 is not tested here: the interpreter computes bf16 wrongly (see
ENVIRONMENT.md); tests/test_kernels_gpu.py covers it on a GPU.
"""
import itertools
import os

import pytest
import torch

kernels = pytest.importorskip("plait.kernels")
if not kernels.HAVE_TRITON:
    pytest.skip("triton is not installed", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") != "1":
    # conftest.py turns the interpreter on only without a GPU; there tests/test_kernels_gpu.py runs instead.
    pytest.skip("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

from kernel_reference import reference_linear, rel_err  # noqa: E402
from plait.kernels.config import signal_config  # noqa: E402
from plait.kernels import (ChunkSignals, SignalTimeoutError, consumer_linear, fused_linear,  # noqa: E402
                           producer_linear)

ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu", "swiglu"]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


def _inputs(lead, n, k, dtype, activation, bias, residual, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * n if activation == "swiglu" else n
    make = lambda *shape: (torch.randn(*shape, generator=gen) / 2).to(dtype).requires_grad_()
    return (make(*lead, k), make(rows, k), make(rows) if bias else None,
            make(*lead, n) if residual else None, torch.randn(*lead, n, generator=gen).to(dtype))


CASES = [((1,), 5, 3), ((37,), 19, 29), ((5, 7), 33, 17), ((70,), 45, 100), ((2, 3, 4), 8, 64)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_linear_forward_backward(activation, dtype):
    seed = 0
    for (lead, n, k), bias, residual in itertools.product(CASES, (True, False), (True, False)):
        seed += 1
        x, w, b, r, dy = _inputs(lead, n, k, dtype, activation, bias, residual, seed)
        where = f"{activation} {dtype} lead={lead} n={n} k={k} bias={bias} residual={residual}"
        y = fused_linear(x, w, b, activation, r)
        assert y.shape == (*lead, n) and y.dtype == dtype, where
        leaves = [t for t in (x, w, b, r) if t is not None]
        got = torch.autograd.grad(y, leaves, dy)
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        it = iter(ref_leaves)
        xd, wd = next(it), next(it)
        bd = next(it) if bias else None
        rd = next(it) if residual else None
        ref = reference_linear(xd, wd, bd, activation, rd)
        want = torch.autograd.grad(ref, ref_leaves, dy.double())
        assert rel_err(y, ref) < TOL[dtype], f"output {where}: {rel_err(y, ref):.2e}"
        for name, g, e in zip(("dx", "dw", "db" if bias else "dr", "dr"), got, want):
            assert rel_err(g, e) < TOL[dtype], f"{name} {where}: {rel_err(g, e):.2e}"


def test_uninitialized_memory_is_poisoned():
    assert torch.isnan(torch.empty(16)).all()


def test_out_argument_and_no_grad_path():
    x, w, b, r, _ = _inputs((9,), 6, 10, torch.float32, "gelu", True, True, 99)
    out = torch.full((9, 6), float("nan"))
    with torch.no_grad():
        y = fused_linear(x, w, b, "gelu", r, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(out, reference_linear(x, w, b, "gelu", r)) < 1e-5


def test_bad_arguments():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    for call, text in ((lambda: fused_linear(x, w, activation="tanh"), "unknown activation"),
                       (lambda: fused_linear(x, w.double()), "dtype"),
                       (lambda: fused_linear(x.double(), w.double()), "dtype"),
                       (lambda: fused_linear(torch.randn(4, 7), w), "do not fit"),
                       (lambda: fused_linear(x, torch.randn(5, 8), activation="swiglu"), "swiglu"),
                       (lambda: fused_linear(x, w, torch.randn(5)), "bias"),
                       (lambda: fused_linear(x, w, residual=torch.randn(4, 5)), "residual"),
                       (lambda: fused_linear(x, w, activation=["relu"]), "unknown activation"),
                       (lambda: fused_linear(x.to("meta"), w.to("meta")), "cannot run on meta"),
                       (lambda: fused_linear(x, w, out=torch.empty(4, 6, requires_grad=True)), "autograd"),
                       (lambda: fused_linear(x.requires_grad_(), w, out=torch.empty(4, 6)), "autograd")):
        with pytest.raises(ValueError, match=text):
            call()


def test_producer_publishes_every_chunk_once_per_epoch():
    for rows, chunks in ((70, 3), (64, 2), (5, 5), (1, 1), (100, 7)):
        signals = ChunkSignals.create(rows, chunks, "cpu")
        x, w = torch.randn(rows, 16), torch.randn(40, 16)
        for epoch in (1, 2):
            y = producer_linear(x, w, activation="relu", signals=signals)
            assert signals.epoch == epoch
            assert signals.flags.tolist() == [epoch] * signals.num_chunks, (rows, chunks)
            assert rel_err(y, reference_linear(x, w, None, "relu", None)) < 1e-5
        # each chunk counted exactly the tiles that overlap it: n-tiles x m-tiles touching its rows
        cfg = signal_config()
        n_tiles = -(-40 // cfg["BN"])
        for c in range(signals.num_chunks):
            first, last = c * signals.rows_per_chunk, min(rows, (c + 1) * signals.rows_per_chunk) - 1
            assert int(signals.counters[c]) == n_tiles * (last // cfg["BM"] - first // cfg["BM"] + 1)


def test_consumer_waits_for_flags_and_reports_a_missing_chunk():
    signals = ChunkSignals.create(70, 3, "cpu")
    x, w1, w2 = torch.randn(70, 16), torch.randn(24, 16), torch.randn(8, 24)
    hidden = producer_linear(x, w1, signals=signals)
    out = consumer_linear(hidden, w2, activation="silu", signals=signals)
    signals.check()
    assert rel_err(out, reference_linear(hidden, w2, None, "silu", None)) < 1e-5
    stale = ChunkSignals.create(70, 3, "cpu")
    stale.flags.copy_(torch.tensor([1, 0, 1], dtype=torch.int32))
    consumer_linear(hidden, w2, signals=stale, epoch=1, timeout_s=1e-5)
    with pytest.raises(SignalTimeoutError, match="chunk 1 of 3"):
        stale.check()
    with pytest.raises(ValueError, match="chunks"):
        consumer_linear(torch.randn(20, 24), w2, signals=signals)
    with pytest.raises(ValueError, match="programs"):  # a negative grid used to leave the output unwritten
        consumer_linear(hidden, w2, signals=signals, programs=-1)
    with pytest.raises(ValueError, match="positive"):
        ChunkSignals.create(0, 2, "cpu")


def test_gemm_benchmark_script_runs(capsys):
    from plait.bench import gemm

    assert gemm.main(["--smoke", "--no-compile"]) == 0
    assert "fused_vs_eager_fwd" in capsys.readouterr().out


# ---------------------------------------------------------------- regressions: layouts and edge cases


def _assert_matches_reference(x, w, b, activation, r, dy, tol=1e-5):
    """fused_linear's output and the gradients of every input that requires grad, against float64."""
    inputs = (x, w, b, r)
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    y = fused_linear(x, w, b, activation, r)
    ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    ref = reference_linear(ref_inputs[0], ref_inputs[1], ref_inputs[2], activation, ref_inputs[3])
    assert rel_err(y, ref) < tol, f"output: {rel_err(y, ref):.2e}"
    if leaves:
        got = torch.autograd.grad(y, leaves, dy)
        want = torch.autograd.grad(ref, [t for t in ref_inputs if t is not None and t.requires_grad], dy.double())
        for i, (g, e) in enumerate(zip(got, want)):
            assert g.shape == e.shape and rel_err(g, e) < tol, f"gradient {i}: {rel_err(g, e):.2e}"


@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_strided_and_expanded_bias(activation):
    """The kernel used to read the bias as if contiguous: a strided slice or an expanded bias gave wrong sums."""
    gen = torch.Generator().manual_seed(3)
    rows = 10 if activation == "swiglu" else 5
    x, w, dy = torch.randn(6, 7, generator=gen), torch.randn(rows, 7, generator=gen), torch.randn(6, 5, generator=gen)
    strided = torch.randn(2 * rows, generator=gen)[::2].requires_grad_()
    expanded = torch.randn(1, generator=gen).expand(rows)
    for bias in (strided, expanded):
        _assert_matches_reference(x.requires_grad_(), w.requires_grad_(), bias, activation, None, dy)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_gradients_with_size_one_or_zero_dimensions(activation):
    """Backward rejected its own saved pre-activation ("prologue_z must match a's ... strides") when the
    incoming gradient had odd strides on a size-1 dimension (N=1 with a transposed grad_output, or
    ``y.sum()`` of a 1x1 output), and when M was 0."""
    gen = torch.Generator().manual_seed(4)
    rows = 2 if activation == "swiglu" else 1
    x, w = torch.randn(4, 3, generator=gen).requires_grad_(), torch.randn(rows, 3, generator=gen).requires_grad_()
    _assert_matches_reference(x, w, None, activation, None, torch.randn(1, 4, generator=gen).t())
    x1 = torch.randn(1, 3, generator=gen).requires_grad_()
    _assert_matches_reference(x1, w, None, activation, None, torch.ones(()).expand(1, 1))
    x0, w2 = torch.randn(0, 3).requires_grad_(), torch.randn(2 * rows, 3, generator=gen).requires_grad_()
    b = torch.randn(2 * rows, generator=gen).requires_grad_()
    dx, dw, db = torch.autograd.grad(fused_linear(x0, w2, b, activation).sum(), (x0, w2, b))
    assert dx.shape == (0, 3) and not dw.any() and not db.any()


def test_zero_features_in_or_out():
    """K = 0 (the output is the bias) and N = 0 (an empty output) used to fail in ``reshape(-1, 0)``."""
    x, w, b = torch.randn(3, 0).requires_grad_(), torch.randn(4, 0).requires_grad_(), torch.randn(4).requires_grad_()
    _assert_matches_reference(x, w, b, "gelu", None, torch.randn(3, 4))
    x, w = torch.randn(2, 3, 5).requires_grad_(), torch.randn(0, 5).requires_grad_()
    y = fused_linear(x, w, None, "relu")
    assert y.shape == (2, 3, 0)
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert dx.shape == x.shape and not dx.any()
    signals = ChunkSignals.create(6, 2, "cpu")
    assert producer_linear(x, w, signals=signals).shape == (2, 3, 0)
    assert signals.flags.tolist() == [1, 1]


def test_gradient_of_the_residual_alone():
    """With only the residual requiring grad, forward saves no pre-activation; the swiglu backward used to
    crash on it (``empty_like(None)``) instead of passing the gradient through."""
    x, r, dy = torch.randn(3, 4), torch.randn(3, 3).requires_grad_(), torch.randn(3, 3)
    for activation, rows in (("swiglu", 6), ("gelu", 3)):
        (dr,) = torch.autograd.grad(fused_linear(x, torch.randn(rows, 4), None, activation, r), r, dy)
        assert torch.equal(dr, dy)


def test_out_with_strides_that_do_not_flatten():
    """A 3-D out= whose strides allow no [rows, N] view was reshaped into a copy, so the kernel wrote the copy
    and out stayed unwritten; the producer, which publishes rows in place, must refuse such an out."""
    gen = torch.Generator().manual_seed(6)
    x, w, b, r = (torch.randn(*shape, generator=gen) for shape in ((2, 3, 4), (10, 4), (10,), (2, 3, 5)))
    out = torch.full((3, 2, 5), float("nan")).transpose(0, 1)
    with torch.no_grad():
        y = fused_linear(x, w, b, "swiglu", r, out=out)
    assert y.data_ptr() == out.data_ptr() and rel_err(out, reference_linear(x, w, b, "swiglu", r)) < 1e-5
    with pytest.raises(ValueError, match="flatten"):
        producer_linear(x, w, signals=ChunkSignals.create(6, 2, "cpu"), out=torch.empty(3, 2, 10).transpose(0, 1))


def test_out_sharing_memory_with_an_input_is_refused():
    """out aliasing x gave silently wrong results (tiles overwrote rows other tiles still read)."""
    x, w, r = torch.randn(40, 40), torch.randn(40, 40), torch.randn(40, 40)
    for name, out in (("x", x), ("weight", w[:, :40]), ("residual", r)):
        with pytest.raises(ValueError, match=f"shares memory with {name}"):
            with torch.no_grad():
                fused_linear(x, w, residual=r, out=out)
    with torch.no_grad():
        fused_linear(x[:20], w, out=x[20:])  # disjoint parts of one storage are fine


def test_double_backward_raises_instead_of_dropping_terms():
    """The backward kernels build no graph, so a second derivative silently lost fused_linear's share
    (``x ** 3`` plus fused_linear: only the cube's term survived); it must raise instead."""
    x, w = torch.randn(4, 6).requires_grad_(), torch.randn(5, 6).requires_grad_()
    (gx,) = torch.autograd.grad(fused_linear(x, w, None, "gelu").sum() + (x ** 3).sum(), x, create_graph=True)
    for wrt in (x, w):
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad(gx.sum(), wrt, retain_graph=True)


def test_layer_dispatch_leaves_autocast_and_mixed_dtypes_to_torch():
    """ColumnParallelLinear on CUDA sent autocast and mixed-dtype inputs to the kernel, which ignores
    autocast and rejects mixed dtypes with a ValueError; those must take the F.linear path."""
    from plait.tp.activations import fusable

    x, w = torch.randn(2, 3), torch.randn(4, 3)
    assert fusable(x, w, None) and fusable(x.half(), w.half(), torch.randn(4).half())
    assert not fusable(x.half(), w, None) and not fusable(x, w, torch.randn(4).double())
    assert not fusable(x.double(), w.double(), None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fusable(x, w, None)


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh", "silu"])
def test_layer_torch_path_matches_the_kernel(activation):
    """linear_activation's CPU path (F.linear + activation) and the kernel: same values and gradients."""
    from plait.tp.activations import linear_activation

    gen = torch.Generator().manual_seed(8)
    x, w, b, dy = (torch.randn(*shape, generator=gen) for shape in ((2, 5, 6), (7, 6), (7,), (2, 5, 7)))
    x, w, b = (3 * x).requires_grad_(), w.requires_grad_(), b.requires_grad_()
    torch_y = linear_activation(x, w, b, activation)
    kernel_y = fused_linear(x, w, b, activation)
    assert rel_err(kernel_y, torch_y) < 1e-5
    for got, want in zip(torch.autograd.grad(kernel_y, (x, w, b), dy), torch.autograd.grad(torch_y, (x, w, b), dy)):
        assert rel_err(got, want) < 1e-5


def test_no_grad_forward_keeps_no_pre_activation(monkeypatch):
    """Under no_grad autograd still reports needs_input_grad for parameters that require grad, so
    inference stored an unused pre-activation (an extra output-sized write) on every call."""
    import plait.kernels.linear as linear

    kept = []
    launch = linear.launch_gemm
    monkeypatch.setattr(linear, "launch_gemm", lambda *args, **kw: kept.append(kw["pre"]) or launch(*args, **kw))
    x, w = torch.randn(3, 4), torch.randn(6, 4).requires_grad_()
    with torch.no_grad():
        y = fused_linear(x, w, None, "swiglu")
    assert kept == [None] and not y.requires_grad
    assert rel_err(y, reference_linear(x, w, None, "swiglu", None)) < 1e-5
    fused_linear(x, w, None, "swiglu")
    assert kept[1] is not None  # with grad enabled it is kept for backward
