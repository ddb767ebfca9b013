"""VocabParallelEmbedding and vocab_parallel_cross_entropy against nn.Embedding / F.cross_entropy."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plait.launch import run_ranks
from tp_reference import block, close


def vocab_checks(rank: int, world: int) -> int:
    import plait

    plait.init_mesh(tp=world)
    checks = 0
    for dtype, vocab, dim, shape, sp in ((torch.float64, 16 * world, 8, (5, 3), False),
                                         (torch.float64, 4 * world, 6, (2 * world, 3), True),
                                         (torch.float32, 10 * world, 12, (37,), False)):
        torch.manual_seed(5)
        dense = nn.Embedding(vocab, dim, dtype=dtype)
        torch.manual_seed(5)
        layer = plait.VocabParallelEmbedding(vocab, dim, sequence_parallel=sp, dtype=dtype)
        close("fresh table", layer.weight, block(dense.weight, 0, rank, world), dtype, "embedding")
        gen = torch.Generator().manual_seed(checks)
        ids = torch.randint(0, vocab, shape, generator=gen)
        dy = torch.randn(*shape, dim, dtype=dtype, generator=gen)
        out = dense(ids)
        (out * dy).sum().backward()
        got = layer(ids)
        close("embedding out", got, block(out, 0, rank, world) if sp else out.detach(), dtype, "embedding")
        (got * (block(dy, 0, rank, world) if sp else dy)).sum().backward()
        close("embedding grad", layer.weight.grad, block(dense.weight.grad, 0, rank, world), dtype, "embedding")

        # cross-entropy over a vocabulary split across ranks, with ignored targets
        logits = torch.randn(*shape, vocab, dtype=dtype, generator=gen, requires_grad=True)
        target = torch.randint(0, vocab, shape, generator=gen)
        target.view(-1)[::4] = -100
        for reduction in ("mean", "sum", "none"):
            want = F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), reduction=reduction)
            want = want.view(shape) if reduction == "none" else want
            local = block(logits, -1, rank, world).detach().requires_grad_()
            got = plait.vocab_parallel_cross_entropy(local, target, reduction=reduction)
            close(f"loss {reduction}", got, want.detach(), dtype, "cross-entropy")
            weight = torch.randn(want.shape, dtype=dtype, generator=gen)
            logits.grad = None
            (want * weight).sum().backward()
            (got * weight).sum().backward()
            close(f"logit grad {reduction}", local.grad, block(logits.grad, -1, rank, world), dtype,
                  "cross-entropy")
        checks += 1
    # half-precision logits reduce in float32
    logits = torch.randn(6, 4 * world, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    target = torch.arange(6) % (4 * world)
    got = plait.vocab_parallel_cross_entropy(block(logits, -1, rank, world), target)
    want = F.cross_entropy(logits.float(), target)
    assert got.dtype == torch.float32 and abs(got.item() - want.item()) < 1e-5
    plait.destroy_mesh()
    return checks


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_matches_dense(tp):
    assert run_ranks(vocab_checks, tp) == [3] * tp
