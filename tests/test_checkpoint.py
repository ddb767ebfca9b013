"""Sharded GPT checkpoints: save on one layout, load on others, export/import the full model;
with ZeRO-1 (optimizer state sharded over DP) on either side."""
import pytest
import torch
import torch.distributed as dist

from plait.launch import run_ranks

CFG = dict(vocab_size=32, num_layers=4, hidden=16, num_heads=4, seq_len=8, dtype=torch.float64)


def _optimizer(stages, zero_comm=None):
    """AdamW over the stages' parameters; ZeRO-1 over ``zero_comm`` (the DP communicator) if given."""
    from plait.dp import ShardedOptimizer

    params = [p for s in stages for p in s.parameters()]
    if zero_comm is None:
        return torch.optim.AdamW(params, lr=0.1)
    return ShardedOptimizer(params, torch.optim.AdamW, zero_comm, bucket_mb=0.001, lr=0.1)


def _step(opt, stages) -> None:
    """One step with gradients that are a fixed function of each parameter (layout independent)."""
    from plait.dp import ShardedOptimizer

    zero = isinstance(opt, ShardedOptimizer)
    if zero:
        opt.start_step(1)
    for p in (p for s in stages for p in s.parameters()):
        grad = torch.sin(p.detach() * 3.0) + 0.5
        if zero:
            p.grad.copy_(grad)  # the gradient is a view into a DP bucket
        else:
            p.grad = grad
    if zero:
        opt.finish()  # every DP rank has the same gradient: the mean is exact
    opt.step()


def _trained(stages, zero_comm=None):
    opt = _optimizer(stages, zero_comm)
    _step(opt, stages)
    return opt


def _singleton():
    from plait.comm import Communicator

    mine, _ = dist.new_subgroups(group_size=1)
    return Communicator.create("torch", mine, name="self")


def _reference():
    """The one-process model after the same step: full params and full Adam moments by name."""
    from plait.models import GPTConfig, build_stages

    stages = build_stages(GPTConfig(**CFG), _singleton(), pp=1, pp_rank=0, seed=3)
    opt = _trained(stages)
    params = dict(stages[0].named_parameters())
    return ({n: p.detach().clone() for n, p in params.items()},
            {n: opt.state[p]["exp_avg"].clone() for n, p in params.items()})


def save(rank: int, world: int, path: str, dp: int = 1, pp: int = 2, tp: int = 2, zero: bool = False) -> None:
    import plait
    from plait.models import GPTConfig, build_stages, save_checkpoint

    mesh = plait.init_mesh(dp=dp, pp=pp, tp=tp)
    stages = build_stages(GPTConfig(**CFG), mesh.tp_comm, pp=pp, pp_rank=mesh.pp_rank, num_virtual=2, seed=3)
    opt = _trained(stages, mesh.dp_comm if zero else None)
    save_checkpoint(path, stages, mesh, opt, step=1, num_virtual=2)
    plait.destroy_mesh()


def load(rank: int, world: int, path: str, pp: int, tp: int, zero: bool = False) -> int:
    import plait
    from plait.models import GPTConfig, build_stages, load_checkpoint

    mesh = plait.init_mesh(dp=world // (pp * tp), pp=pp, tp=tp)
    want_params, want_moments = _reference()
    stages = build_stages(GPTConfig(**CFG), mesh.tp_comm, pp=pp, pp_rank=mesh.pp_rank, seed=99)
    opt = _optimizer(stages, mesh.dp_comm if zero else None)
    step = load_checkpoint(path, stages, opt)
    state = opt.gather_state() if zero else opt.state
    if zero:  # this rank holds only its DP slice: about 1/dp of the moments
        full = sum(2 * p.numel() * p.element_size() for s in stages for p in s.parameters())
        assert opt.state_bytes() < full / mesh.dp + 1024
    checked = 0
    for stage in stages:
        for name, param in stage.named_parameters():
            split = getattr(param, "tp_split_dim", None)
            shard = lambda t: t if split is None else t.chunk(tp, dim=split)[mesh.tp_rank]
            torch.testing.assert_close(param.detach(), shard(want_params[name]), rtol=0, atol=0, msg=name)
            torch.testing.assert_close(state[param]["exp_avg"], shard(want_moments[name]), rtol=0, atol=0)
            checked += 1
    _step(opt, stages)  # the loaded state is usable
    with pytest.raises(ValueError, match="incompatible model: hidden"):
        load_checkpoint(path, build_stages(GPTConfig(**dict(CFG, hidden=32)), mesh.tp_comm, pp=pp,
                                           pp_rank=mesh.pp_rank))
    plait.destroy_mesh()
    return step, checked


def test_checkpoint_reshards_across_layouts(tmp_path):
    from plait.models import export_full_state_dict

    path = str(tmp_path / "ckpt")
    run_ranks(save, 4, path)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "meta.json", "shard-pp0-tp0.pt", "shard-pp0-tp1.pt", "shard-pp1-tp0.pt", "shard-pp1-tp1.pt"]
    for world, pp, tp in ((2, 1, 2), (1, 1, 1), (2, 2, 1)):
        results = run_ranks(load, world, path, pp, tp)
        assert all(step == 1 for step, _ in results)
        assert sum(n for _, n in results) == 49 * (world // pp)  # every parameter once per TP rank
    full = export_full_state_dict(path)
    assert len(full) == 49 and full["blocks.2.mlp.fc1.weight"].shape == (64, 16)
    results = run_ranks(_import_matches, 2, full)
    assert results == [49, 49]


def _import_matches(rank: int, world: int, full: dict) -> int:
    import plait
    from plait.models import GPTConfig, build_stages, full_state_dict, import_full_state_dict

    mesh = plait.init_mesh(tp=world)
    stages = build_stages(GPTConfig(**CFG), mesh.tp_comm, pp=1, pp_rank=0, seed=123)
    import_full_state_dict(stages, full)
    back = full_state_dict(stages)
    for name, value in full.items():
        torch.testing.assert_close(back[name], value, rtol=0, atol=0)
    plait.destroy_mesh()
    return len(back)


def test_zero1_checkpoint_round_trip(tmp_path):
    """ZeRO-1 (dp=2, tp=2) saves the ordinary per-parameter layout, which loads onto a plain run on
    (pp=2, tp=1); and a plain (pp=2, tp=2) checkpoint loads onto a ZeRO-1 run on (dp=2, tp=1)."""
    zero_path, plain_path = str(tmp_path / "zero"), str(tmp_path / "plain")
    run_ranks(save, 4, zero_path, 2, 1, 2, True)
    results = run_ranks(load, 2, zero_path, 2, 1)
    assert sum(n for _, n in results) == 49 and all(step == 1 for step, _ in results)
    run_ranks(save, 4, plain_path, 1, 2, 2, False)
    results = run_ranks(load, 2, plain_path, 1, 1, True)
    assert [n for _, n in results] == [49, 49] and all(step == 1 for step, _ in results)
