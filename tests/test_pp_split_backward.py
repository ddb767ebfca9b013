"""The I/W split of a stage's backward (plait.pp.split_backward) against one full backward."""
import torch
from torch import nn

from plait.pp.runner import ActivationMemory
from plait.pp.split_backward import backward_input, backward_weight


class Tied(nn.Module):
    """One weight used twice, a residual and an unused parameter: the awkward cases."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.unused = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.a(torch.relu(self.b(torch.tanh(self.a(x))))) * 2 + x


def models():
    torch.manual_seed(0)
    yield nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 6)).double()
    yield Tied().double()
    yield nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 6)).double()


def test_split_equals_full_backward_and_fires_hooks():
    for model in models():
        params = [p for p in model.parameters()]
        x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
        grad_out = torch.randn(3, 5, 6, dtype=torch.float64)
        model(x).backward(grad_out)
        want = [None if p.grad is None else p.grad.clone() for p in params]
        want_x = x.grad.clone()
        for p in params:
            p.grad = None
        fired = []
        hooks = [p.register_post_accumulate_grad_hook(lambda p, i=i: fired.append(i)) for i, p in enumerate(params)]
        memory = ActivationMemory(params)
        x2 = x.detach().clone().requires_grad_()
        for _ in range(2):  # two microbatches accumulate
            with memory.hooks():
                y = model(x2)
            dx, work = backward_input(y, grad_out, x2, params)
            if _ == 0:
                assert all(p.grad is None for p in params)  # I leaves the weights alone
            del y
            assert torch.allclose(dx, want_x, rtol=1e-12, atol=1e-12)
            backward_weight(work)
            assert memory.live == 0  # everything saved for backward is gone after W
        for p, w in zip(params, want):
            assert (p.grad is None) == (w is None)
            if w is not None:
                assert torch.allclose(p.grad, 2 * w, rtol=1e-12, atol=1e-12)
        used = sum(w is not None for w in want)
        assert sorted(fired) == sorted(i for i, w in enumerate(want) if w is not None for _ in range(2))
        assert len(fired) == 2 * used
        for hook in hooks:
            hook.remove()


def test_split_without_an_input_gradient_does_all_in_w():
    model = nn.Linear(4, 4).double()
    x = torch.randn(2, 4, dtype=torch.float64)  # the first stage: data needs no gradient
    y = model(x)
    dx, work = backward_input(y, torch.ones_like(y), x, list(model.parameters()))
    assert dx is None and model.weight.grad is None
    backward_weight(work)
    assert torch.allclose(model.weight.grad, torch.ones(2, 4, dtype=torch.float64).T @ x)
    # An output that ignores the input sends a zero gradient back.
    model.zero_grad(set_to_none=True)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    y = model.bias * torch.ones(2, 4, dtype=torch.float64)
    dx, work = backward_input(y, torch.ones_like(y), x, list(model.parameters()))
    assert torch.equal(dx, torch.zeros_like(x))
    backward_weight(work)
    assert torch.allclose(model.bias.grad, torch.full((4,), 2.0, dtype=torch.float64))


def test_split_of_a_stage_without_a_graph():
    # A pass-through stage (nn.Identity) returns its input itself: I must hand the output
    # gradient back upstream, not zeros (zb1p once dropped every gradient above such a stage).
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, dtype=torch.float64)
    dx, work = backward_input(nn.Identity()(x), grad, x, [])
    assert torch.equal(dx, grad)
    backward_weight(work)
    assert x.grad is None  # the input gradient travels as dx, never into .grad
    # A stage that returns a parameter: nothing flows to the input, W fills the parameter's .grad.
    weight = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    dx, work = backward_input(weight, grad, x, [weight])
    assert torch.equal(dx, torch.zeros_like(x)) and weight.grad is None
    backward_weight(work)
    assert torch.equal(weight.grad, grad)
