"""ParallelMesh: coordinates, groups along each axis, neighbours, config errors."""
import pytest
import torch

from plait.launch import run_ranks


def mesh_facts(rank: int, world: int, dp: int, pp: int, tp: int) -> dict:
    import plait

    mesh = plait.init_mesh(dp=dp, pp=pp, tp=tp)
    assert mesh.rank_of(*mesh.coords) == rank and mesh.world_size == world
    members = {}
    for axis in ("dp", "pp", "tp"):
        comm = mesh.comms[axis]
        members[axis] = comm.all_gather(torch.tensor([rank]), dim=0).tolist()
        assert members[axis] in mesh.axis_lines(axis)
    assert mesh.device_mesh.mesh_dim_names == ("dp", "pp", "tp")
    facts = dict(coords=mesh.coords, members=members, prev=mesh.pp_prev, next=mesh.pp_next,
                 first=mesh.is_first_stage, last=mesh.is_last_stage)
    plait.destroy_mesh()
    return facts


def test_mesh_2x2x2_tp_innermost():
    facts = run_ranks(mesh_facts, 8, 2, 2, 2)
    for rank, f in enumerate(facts):
        assert f["coords"] == (rank // 4, (rank // 2) % 2, rank % 2)
        assert f["members"]["tp"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert f["members"]["pp"] == [rank % 2 + 4 * (rank // 4), rank % 2 + 4 * (rank // 4) + 2]
        assert f["members"]["dp"] == [rank % 4, rank % 4 + 4]
        stage = (rank // 2) % 2
        assert f["prev"] == (None if stage == 0 else rank - 2)
        assert f["next"] == (None if stage == 1 else rank + 2)
        assert f["first"] == (stage == 0) and f["last"] == (stage == 1)


def test_mesh_pp4():
    facts = run_ranks(mesh_facts, 4, 1, 4, 1)
    assert [f["prev"] for f in facts] == [None, 0, 1, 2]
    assert [f["next"] for f in facts] == [1, 2, 3, None]


def wrong_product(rank: int, world: int) -> str:
    import plait

    with pytest.raises(ValueError) as info:
        plait.init_mesh(dp=1, pp=1, tp=3)
    return str(info.value)


def disagreeing_ranks(rank: int, world: int) -> str:
    import plait

    with pytest.raises(ValueError) as info:
        plait.init_mesh(dp=2 if rank == 0 else 1, tp=1 if rank == 0 else 2)
    return str(info.value)


def test_mesh_config_errors():
    assert "torchrun started 2" in run_ranks(wrong_product, 2)[0]
    message = run_ranks(disagreeing_ranks, 2)[1]
    assert "disagree" in message and "rank 0" in message


def test_single_process_mesh_without_torchrun():
    import plait

    with pytest.raises(ValueError, match="torchrun"):
        plait.init_mesh(tp=2)
    with pytest.raises(ValueError, match="positive"):
        plait.init_mesh(tp=0)
    result = run_ranks(_alone, 1)
    assert result == [(0, 0, 0)]


def _alone(rank: int, world: int):
    import os

    import plait

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        os.environ.pop(key, None)
    mesh = plait.init_mesh()
    layer = plait.ColumnParallelLinear(4, 6)
    assert layer(torch.ones(2, 4)).shape == (2, 6)
    coords = mesh.coords
    plait.destroy_mesh()
    return coords


def test_a_rank_whose_peers_never_join_says_what_to_check():
    """Rank 0 of 2 alone (as when a host runs the wrong --node-rank or --nnodes): a CommError within the timeout
    that names the rendezvous address and the flags to check, not torch's store trace."""
    import os
    import subprocess
    import sys

    from plait.launch import free_port

    port = free_port()
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "GROUP_RANK": "0", "PLAIT_TIMEOUT_S": "3"}
    code = "import plait; plait.init_mesh(dp=2)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("plait.errors.CommError: rank 0 of 2 on node 0 could not join the job at "
                           f"127.0.0.1:{port} within 3 s"), last
    assert "--nnodes" in last and "--node-rank" in last, last
