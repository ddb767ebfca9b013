"""The reference GPT: TP (with and without SP) and chunked layouts equal the one-process model."""
import pytest
import torch
import torch.distributed as dist

from plait.config import ParallelConfig
from plait.launch import run_ranks

TINY = dict(vocab_size=32, num_layers=4, hidden=16, num_heads=4, seq_len=8, dtype=torch.float64)


def _singleton_comm():
    from plait.comm import Communicator

    mine, _ = dist.new_subgroups(group_size=1)
    return Communicator.create("torch", mine, name="self")


def _batch(cfg, seed=0, batch=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _loss_and_grads(stages, comm, ids, targets):
    from plait.models import full_state_dict, gpt_loss

    x = ids
    for stage in stages:
        x = stage(x)
    loss = gpt_loss(x, targets, comm)
    loss.backward()
    return loss.detach(), full_state_dict(stages, grads=True)


def tp_matches_one_process(rank: int, world: int, sp: bool) -> int:
    import plait
    from plait.models import GPTConfig, build_stages

    mesh = plait.init_mesh(tp=world)
    cfg = GPTConfig(**TINY, sequence_parallel=sp)
    ids, targets = _batch(cfg)
    one = build_stages(cfg, _singleton_comm(), pp=1, pp_rank=0, seed=5)
    ref_loss, ref_grads = _loss_and_grads(one, one[0].comm, ids, targets)
    par = build_stages(cfg, mesh.tp_comm, pp=1, pp_rank=0, seed=5)
    loss, grads = _loss_and_grads(par, mesh.tp_comm, ids, targets)
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


def chunks_match_whole(rank: int, world: int) -> None:
    import plait
    from plait.models import GPTConfig, build_stages, partition

    plait.init_mesh()
    comm = _singleton_comm()
    cfg = GPTConfig(**dict(TINY, num_layers=6))
    ids, targets = _batch(cfg, seed=1)
    whole = build_stages(cfg, comm, pp=1, pp_rank=0, seed=9)
    ref_loss, ref_grads = _loss_and_grads(whole, comm, ids, targets)
    for pp, virtual in ((2, 1), (3, 1), (2, 2), (3, 2)):
        chunks = {}
        for pp_rank in range(pp):
            for j, stage in enumerate(build_stages(cfg, comm, pp=pp, pp_rank=pp_rank, num_virtual=virtual, seed=9)):
                chunks[pp_rank + j * pp] = stage
        ordered = [chunks[c] for c in sorted(chunks)]
        assert [s.layer_range for s in ordered] == partition(cfg, pp * virtual)
        loss, grads = _loss_and_grads(ordered, comm, ids, targets)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0, msg=name)
    plait.destroy_mesh()


def test_gpt_chunks_equal_whole_model():
    run_ranks(chunks_match_whole, 1)


def test_partition_balances_and_rejects_bad_layouts():
    from plait.models import GPTConfig, partition

    cfg = GPTConfig(vocab_size=50000, num_layers=8, hidden=64, num_heads=4, seq_len=128)
    ranges = partition(cfg, 4)
    assert [len(r) for r in ranges][0] >= [len(r) for r in ranges][-1]  # the big head takes layers away
    assert sum(len(r) for r in ranges) == 8 and all(len(r) >= 1 for r in ranges)
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by tp=3"):
        ParallelConfig(tp=3).check_model(cfg.shape())
    with pytest.raises(ValueError, match="fewer than pp x virtual"):
        ParallelConfig(pp=4, num_virtual=3, schedule="interleaved").check_model(cfg.shape())
    with pytest.raises(ValueError, match="divisible by num_heads"):
        GPTConfig(vocab_size=8, num_layers=1, hidden=10, num_heads=4, seq_len=4)
