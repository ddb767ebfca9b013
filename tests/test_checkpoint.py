"""Sharded GPT checkpoints: save on one layout, load on others, export/import the full model."""
import pytest
import torch
import torch.distributed as dist

from plait.launch import run_ranks

CFG = dict(vocab_size=32, num_layers=4, hidden=16, num_heads=4, seq_len=8, dtype=torch.float64)


def _trained(stages):
    """One AdamW step with gradients that are a fixed function of each parameter (layout independent)."""
    params = [p for s in stages for p in s.parameters()]
    opt = torch.optim.AdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.sin(p.detach() * 3.0) + 0.5
    opt.step()
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


def save(rank: int, world: int, path: str) -> None:
    import plait
    from plait.models import GPTConfig, build_stages, save_checkpoint

    mesh = plait.init_mesh(pp=2, tp=2)
    stages = build_stages(GPTConfig(**CFG), mesh.tp_comm, pp=2, pp_rank=mesh.pp_rank, num_virtual=2, seed=3)
    save_checkpoint(path, stages, mesh, _trained(stages), step=1, num_virtual=2)
    plait.destroy_mesh()


def load(rank: int, world: int, path: str, pp: int, tp: int) -> int:
    import plait
    from plait.models import GPTConfig, build_stages, load_checkpoint

    mesh = plait.init_mesh(pp=pp, tp=tp)
    want_params, want_moments = _reference()
    stages = build_stages(GPTConfig(**CFG), mesh.tp_comm, pp=pp, pp_rank=mesh.pp_rank, seed=99)
    opt = torch.optim.AdamW([p for s in stages for p in s.parameters()], lr=0.1)
    step = load_checkpoint(path, stages, opt)
    checked = 0
    for stage in stages:
        for name, param in stage.named_parameters():
            split = getattr(param, "tp_split_dim", None)
            shard = lambda t: t if split is None else t.chunk(tp, dim=split)[mesh.tp_rank]
            torch.testing.assert_close(param.detach(), shard(want_params[name]), rtol=0, atol=0, msg=name)
            torch.testing.assert_close(opt.state[param]["exp_avg"], shard(want_moments[name]), rtol=0, atol=0)
            checked += 1
    opt.step()  # the loaded state is usable
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
