"""The reference GPT through ``plait.parallelize``: TP (with and without SP) and every cut of its layers
into pp x virtual chunks equal the plain one-process model (float64)."""
import pytest
import torch

from plait.config import ParallelConfig
from plait.launch import run_ranks

TINY = dict(vocab_size=32, num_layers=4, hidden=16, num_heads=4, seq_len=8, dtype=torch.float64)
SIX = dict(TINY, num_layers=6)


def _gpt(cfg, seed: int):
    from plait.models import GPT, init_parameters

    model = GPT(cfg)
    init_parameters(model, seed)
    return model


def _batch(cfg, seed=0, batch=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _plain_loss_and_grads(model, loss_fn, ids, targets):
    """The plain model's loss and its gradients by parameter name."""
    loss = loss_fn(model(ids), targets)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def _parallel_loss_and_grads(model, ids, targets):
    """One training step of the parallel model (one microbatch), and every whole gradient on every rank."""
    loss = model.pipeline(num_microbatches=1).train_step(ids, targets)
    return loss.detach(), model.full_state_dict(grads=True)


def _cut(cfg, num_chunks: int) -> list[range]:
    """The layer ranges parallelize cuts the GPT into: the stage cutting with the GPT's own costs."""
    from plait.models import GPT
    from plait.parallel.stage import balanced_partition

    with torch.device("meta"):
        return balanced_partition(cfg.num_layers, num_chunks, *GPT(cfg).stage_costs())


def tp_matches_one_process(rank: int, world: int, sp: bool) -> int:
    import plait
    from plait.models import GPTConfig

    mesh = plait.init_mesh(ParallelConfig(tp=world, sequence_parallel=sp))
    cfg = GPTConfig(**TINY)
    ids, targets = _batch(cfg)
    ref_loss, ref_grads = _plain_loss_and_grads(
        _gpt(cfg, 5), lambda logits, t: torch.nn.functional.cross_entropy(logits.flatten(0, 1), t.flatten()),
        ids, targets)
    model = plait.parallelize(_gpt(cfg, 5), mesh)
    assert model.config.sequence_parallel == sp
    loss, grads = _parallel_loss_and_grads(model, ids, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-10, msg=name)
    plait.destroy_mesh()
    return len(grads)


@pytest.mark.parametrize("sp", [False, True])
def test_gpt_tp2_equals_one_process(sp):
    counts = run_ranks(tp_matches_one_process, 2, sp)
    assert counts[0] == 4 * 11 + 2 + 3  # 11 tensors per block (no QKV bias), embedding 2, head 3


def chunks_match_whole(rank: int, world: int) -> dict[int, list[range]]:
    """pp = world ranks, 1 and 2 virtual stages each: loss and gradients are the plain model's, bit for bit.
    Returns this rank's stages' layer ranges by virtual-stage count."""
    import plait
    from plait.models import GPTConfig

    mesh = plait.init_mesh(pp=world)
    cfg = GPTConfig(**SIX)
    ids, targets = _batch(cfg, seed=1)
    ranges = {}
    for virtual in (1, 2):
        config = ParallelConfig(pp=world, num_virtual=virtual, schedule="interleaved" if virtual > 1 else "1f1b")
        model = plait.parallelize(_gpt(cfg, 9), mesh, config=config)
        # the same loss function on the plain model's logits (tp=1: the whole-vocabulary cross-entropy)
        ref_loss, ref_grads = _plain_loss_and_grads(_gpt(cfg, 9), model.loss_fn, ids, targets)
        loss, grads = _parallel_loss_and_grads(model, ids, targets)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0, msg=name)
        ranges[virtual] = [stage.layer_range for stage in model.stages]
    plait.destroy_mesh()
    return ranges


@pytest.mark.parametrize("pp", [2, 3])
def test_gpt_chunks_equal_whole_model(pp):
    from plait.models import GPTConfig

    by_rank = run_ranks(chunks_match_whole, pp)
    for virtual in (1, 2):
        chunks = pp * virtual
        # chunk c lives on pipeline rank c % pp, as that rank's stage c // pp
        ordered = [by_rank[c % pp][virtual][c // pp] for c in range(chunks)]
        assert ordered == _cut(GPTConfig(**SIX), chunks)


def test_partition_balances_and_rejects_bad_layouts():
    from plait.models import GPTConfig

    # 6 equal blocks, a light embedding and head: the two-block chunks go in the middle
    assert _cut(GPTConfig(**SIX), 4) == [range(0, 1), range(1, 3), range(3, 5), range(5, 6)]
    cfg = GPTConfig(vocab_size=50000, num_layers=8, hidden=64, num_heads=4, seq_len=128)
    ranges = _cut(cfg, 4)
    assert [len(r) for r in ranges][0] >= [len(r) for r in ranges][-1]  # the big head takes layers away
    assert sum(len(r) for r in ranges) == 8 and all(len(r) >= 1 for r in ranges)
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by tp=3"):
        ParallelConfig(tp=3).check_model(cfg.shape())
    with pytest.raises(ValueError, match="fewer than pp x virtual"):
        ParallelConfig(pp=4, num_virtual=3, schedule="interleaved").check_model(cfg.shape())
    with pytest.raises(ValueError, match="divisible by num_heads"):
        GPTConfig(vocab_size=8, num_layers=1, hidden=10, num_heads=4, seq_len=4)
