"""Checks of tensor-parallel layers against dense PyTorch, run inside each rank.

Every check builds the dense module and the parallel one from the same seed,
feeds both the same fresh random data (same generator on every rank), and
compares outputs, input gradients and parameter gradients shard by shard.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

import plait
from plait.tp.activations import apply_activation

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}   # bf16: GPU-only cases, two roundings apart


def close(name: str, got: torch.Tensor, want: torch.Tensor, dtype, where: str) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{where}: {name} shape {list(got.shape)} != {list(want.shape)}")
    if not torch.allclose(got, want, **TOL[dtype]):
        err = (got - want).abs().max().item()
        raise AssertionError(f"{where}: {name} differs, max abs err {err:.3e}")


def block(t: torch.Tensor, dim: int, rank: int, parts: int) -> torch.Tensor:
    return t.chunk(parts, dim=dim)[rank]


def _dense_and_parallel(case: dict, cls, **layer_kwargs):
    """nn.Linear and the parallel layer from one seed, plus fresh input and output-gradient data."""
    k, n, dtype, dev = case["k"], case["n"], case["dtype"], case.get("device", "cpu")
    torch.manual_seed(case["seed"])
    dense = nn.Linear(k, n, bias=case["bias"], dtype=dtype, device=dev)
    torch.manual_seed(case["seed"])
    layer = cls(k, n, bias=case["bias"], sequence_parallel=case["sp"], overlap=case["overlap"], dtype=dtype,
                device=dev, group=case.get("group"), **layer_kwargs)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    x = torch.randn(*case["shape"], k, dtype=dtype, generator=gen).to(dev).requires_grad_()
    dy = torch.randn(*case["shape"], n, dtype=dtype, generator=gen).to(dev)
    return dense, layer, x, dy


def check_column(case: dict, tp: int, rank: int) -> None:
    dtype, bias, sp, gather, act = case["dtype"], case["bias"], case["sp"], case["gather"], case["act"]
    where = f"ColumnParallelLinear tp={tp} {case}"
    dense, layer, x, dy = _dense_and_parallel(case, plait.ColumnParallelLinear, gather_output=gather, activation=act)
    close("fresh weight", layer.weight, block(dense.weight, 0, rank, tp), dtype, where)
    y = apply_activation(dense(x), act)
    (y * dy).sum().backward()

    x_in = (block(x, 0, rank, tp) if sp else x).detach().requires_grad_()
    y_par = layer(x_in)
    want_y = y if gather else block(y, -1, rank, tp)
    close("output", y_par, want_y.detach(), dtype, where)
    (y_par * (dy if gather else block(dy, -1, rank, tp))).sum().backward()
    close("input grad", x_in.grad, block(x.grad, 0, rank, tp) if sp else x.grad, dtype, where)
    close("weight grad", layer.weight.grad, block(dense.weight.grad, 0, rank, tp), dtype, where)
    if bias:
        close("bias grad", layer.bias.grad, block(dense.bias.grad, 0, rank, tp), dtype, where)


def check_row(case: dict, tp: int, rank: int) -> None:
    dtype, bias, sp, parallel_in = case["dtype"], case["bias"], case["sp"], case["parallel_in"]
    where = f"RowParallelLinear tp={tp} {case}"
    dense, layer, x, dy = _dense_and_parallel(case, plait.RowParallelLinear, input_is_parallel=parallel_in)
    close("fresh weight", layer.weight, block(dense.weight, 1, rank, tp), dtype, where)
    y = dense(x)
    (y * dy).sum().backward()

    x_in = (block(x, -1, rank, tp) if parallel_in else x).detach().requires_grad_()
    y_par = layer(x_in)
    close("output", y_par, (block(y, 0, rank, tp) if sp else y).detach(), dtype, where)
    (y_par * (block(dy, 0, rank, tp) if sp else dy)).sum().backward()
    close("input grad", x_in.grad, block(x.grad, -1, rank, tp) if parallel_in else x.grad, dtype, where)
    close("weight grad", layer.weight.grad, block(dense.weight.grad, 1, rank, tp), dtype, where)
    if bias:
        close("bias grad", layer.bias.grad, dense.bias.grad, dtype, where)


def layer_cases(tp: int) -> list[dict]:
    """Configurations covering overlap x SP x shapes x dtypes, sized for CI."""
    cases = []
    seed = 100
    for overlap, sp, dtype in itertools.product(("none", "chunked"), (False, True),
                                                (torch.float64, torch.float32)):
        # odd token counts and 3-D inputs; under SP dim 0 (the sequence) must divide by tp
        shapes = [(37 * tp,), (4 * tp, 3)] if sp else [(37,), (5, 3), (70,)]  # 37 rows: 2 uneven chunks
        for shape in shapes:
            seed += 1
            for bias in (True, False):
                cases.append(dict(kind="column", shape=shape, k=24, n=8 * tp, dtype=dtype, bias=bias, sp=sp,
                                  gather=(not sp and bias), act=("gelu" if bias else None),
                                  overlap=overlap, seed=seed))
                cases.append(dict(kind="row", shape=shape, k=8 * tp, n=20, dtype=dtype, bias=bias, sp=sp,
                                  parallel_in=(sp or bias), overlap=overlap, seed=seed + 50))
    for act in ("relu", "gelu_tanh", "silu"):
        cases.append(dict(kind="column", shape=(9, 2), k=16, n=4 * tp, dtype=torch.float64, bias=True,
                          sp=False, gather=False, act=act, overlap="auto", seed=7))
    return cases


def run_layer_cases(rank: int, world: int, device: str = "cpu", backend=None) -> int:
    """Every case of :func:`layer_cases` on this rank; ``device`` "cuda" puts data and layers on the GPU."""
    if device == "cuda":
        torch.cuda.set_device(0)  # ranks share the one GPU of the test machine
    plait.init_mesh(tp=world, backend=backend)
    cases = [dict(case, device=device) for case in layer_cases(world)]
    for case in cases:
        (check_column if case["kind"] == "column" else check_row)(case, world, rank)
    plait.destroy_mesh()
    return len(cases)


def fused_cases(tp: int) -> list[dict]:
    """overlap="fused" configurations: float32 (TF32 off) for exact comparison, bfloat16 for the 16-bit
    kernels; row and column layers alternate, so one symmetric buffer serves both in turn."""
    cases, seed = [], 500
    for sp, shape, bias in itertools.product((False, True), ((300,), (4, 37)), (True, False)):
        seed += 1
        rows = (shape[0] * tp,) + shape[1:] if sp else shape
        for dtype in (torch.float32, torch.bfloat16):
            cases.append(dict(kind="column", shape=rows, k=40, n=16 * tp, dtype=dtype, bias=bias, sp=sp,
                              gather=not sp and bias, act=("gelu" if bias else None), overlap="fused", seed=seed))
            cases.append(dict(kind="row", shape=rows, k=16 * tp, n=48, dtype=dtype, bias=bias, sp=sp,
                              parallel_in=sp or bias, overlap="fused", seed=seed + 50))
    return cases


def run_fused_cases(rank: int, world: int) -> int:
    """Every :func:`fused_cases` case on this rank, the layers on plait's IPC communicator (ranks share GPU 0)."""
    from plait.comm import Communicator

    torch.cuda.set_device(0)
    torch.backends.cuda.matmul.allow_tf32 = False   # IEEE fp32 products on both sides of the comparison
    plait.init_mesh(tp=world, backend="gloo")
    ipc = Communicator.create("ipc", None, name="fused-tp", timeout_s=30)
    cases = [dict(case, device="cuda", group=ipc) for case in fused_cases(world)]
    for _ in range(2):   # the second pass reuses the buffer at later epochs
        for case in cases:
            (check_column if case["kind"] == "column" else check_row)(case, world, rank)
    torch.cuda.synchronize()
    plait.destroy_mesh()
    return len(cases)


def train_mlp(rank: int, world: int, overlap: str, sp: bool, steps: int = 3) -> int:
    """Column(GELU) -> Row MLP vs the dense MLP over several SGD steps (float64)."""
    plait.init_mesh(tp=world)
    dtype, hidden, ffn = torch.float64, 16, 8 * world
    torch.manual_seed(3)
    fc1, fc2 = nn.Linear(hidden, ffn, dtype=dtype), nn.Linear(ffn, hidden, dtype=dtype)
    col = plait.ColumnParallelLinear.from_linear(fc1, activation="gelu", sequence_parallel=sp, overlap=overlap)
    row = plait.RowParallelLinear.from_linear(fc2, sequence_parallel=sp, overlap=overlap)
    dense_opt = torch.optim.SGD([*fc1.parameters(), *fc2.parameters()], lr=0.1)
    par_opt = torch.optim.SGD([*col.parameters(), *row.parameters()], lr=0.1)
    gen = torch.Generator().manual_seed(11)
    for step in range(steps):
        x = torch.randn(16 * world, 3, hidden, dtype=dtype, generator=gen)
        target = torch.randn(16 * world, 3, hidden, dtype=dtype, generator=gen)
        loss = F.mse_loss(fc2(F.gelu(fc1(x))), target)
        x_in = block(x, 0, rank, world) if sp else x
        t_in = block(target, 0, rank, world) if sp else target
        out = row(col(x_in))
        # Under SP each rank holds 1/world of the tokens: the mean over all tokens is the sum of shard means / world.
        par_loss = F.mse_loss(out, t_in) / (world if sp else 1)
        for opt, value in ((dense_opt, loss), (par_opt, par_loss)):
            opt.zero_grad()
            value.backward()
            opt.step()
        where = f"MLP step {step} overlap={overlap} sp={sp}"
        close("fc1 weight", col.weight, block(fc1.weight, 0, rank, world), dtype, where)
        close("fc2 weight", row.weight, block(fc2.weight, 1, rank, world), dtype, where)
        close("fc2 bias", row.bias, fc2.bias, dtype, where)
    dense_back = row.to_linear()
    close("to_linear", dense_back.weight, fc2.weight, dtype, "to_linear")
    plait.destroy_mesh()
    return steps
