"""plait.kernels compiled for the GPU: realistic sizes, bf16/fp16/fp32, and signals across streams."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")]

kernels = pytest.importorskip("plait.kernels")

from kernel_reference import reference_linear, rel_err  # noqa: E402

TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "silu", "swiglu"])
@pytest.mark.parametrize("m,n,k", [(4096, 4096, 4096), (2047, 1792, 4096), (1, 14336, 4096), (8192, 1024, 3584)])
def test_fused_linear_realistic_sizes(dtype, activation, m, n, k):
    gen = torch.Generator(device="cuda").manual_seed(m + n + k)
    rows = 2 * n if activation == "swiglu" else n
    make = lambda *s: (torch.randn(*s, device="cuda", generator=gen) / k ** 0.25).to(dtype).requires_grad_()
    x, w, b, r = make(m, k), make(rows, k), make(rows), make(m, n)
    dy = torch.randn(m, n, device="cuda", generator=gen).to(dtype)
    y = kernels.fused_linear(x, w, b, activation, r)
    got = torch.autograd.grad(y, (x, w, b, r), dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b, r)]
    ref = reference_linear(*leaves[:3], activation, leaves[3])
    want = torch.autograd.grad(ref, leaves, dy.double())
    assert rel_err(y, ref) < TOL[dtype]
    for name, g, e in zip(("dx", "dw", "db", "dr"), got, want):
        assert rel_err(g, e) < TOL[dtype], f"{name}: {rel_err(g, e):.2e}"


def test_tf32_tolerance_when_allowed():
    x, w = torch.randn(1024, 2048, device="cuda"), torch.randn(512, 2048, device="cuda")
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        y = kernels.fused_linear(x, w)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert rel_err(y, reference_linear(x, w, None, None, None)) < 3e-4


def test_producer_and_consumer_on_two_streams():
    """The consumer starts first and spins on flags the producer, on another stream, publishes."""
    m, k, n, n2 = 8192, 4096, 4096, 1024
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    w2 = torch.randn(n2, n, device="cuda", dtype=torch.bfloat16) / n ** 0.5
    signals = kernels.ChunkSignals.create(m, 8, "cuda")
    hidden = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    producer_stream, consumer_stream = torch.cuda.Stream(), torch.cuda.Stream()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for _ in range(3):  # several rounds: epochs grow, flags are never reset
        epoch = signals.next_epoch()
        torch.cuda.synchronize()
        with torch.cuda.stream(consumer_stream):
            out = kernels.consumer_linear(hidden, w2, signals=signals, epoch=epoch, programs=sms // 2, timeout_s=10)
        with torch.cuda.stream(producer_stream):
            kernels.producer_linear(x, w1, activation="gelu", signals=signals, epoch=epoch, out=hidden)
        torch.cuda.synchronize()
        signals.check()
        ref = reference_linear(reference_linear(x, w1, None, "gelu", None).to(torch.bfloat16), w2, None, None, None)
        assert rel_err(out, ref) < 1e-2
        assert signals.flags.tolist() == [epoch] * signals.num_chunks


def test_consumer_times_out_instead_of_hanging():
    signals = kernels.ChunkSignals.create(1024, 4, "cuda")
    a = torch.randn(1024, 256, device="cuda")
    kernels.consumer_linear(a, torch.randn(128, 256, device="cuda"), signals=signals, epoch=1, timeout_s=0.01)
    with pytest.raises(kernels.SignalTimeoutError):
        signals.check()
