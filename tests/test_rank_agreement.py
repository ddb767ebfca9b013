"""Ranks that disagree fail together, with a message naming what differs per rank, never a crash or hang.

Two-process jobs (gloo): the job fingerprint of ``init_mesh``, the shapes and dtypes of TP
layers and of the pipeline engine, and, with ``PLAIT_CHECK_CALLS=1``, every collective call
of the torch backend (including a row-parallel layer given another batch on one rank, which
without the check kills the process inside gloo).
"""
from __future__ import annotations

import os
from typing import Callable

import pytest
import torch
from torch import nn

from plait.comm.agree import check_calls_enabled, disagreements
from plait.launch import run_ranks


def _error(call: Callable[[], object], kind: type[BaseException] = ValueError) -> str:
    """The message of the `kind` error `call` raises (AssertionError if it raises none)."""
    try:
        call()
    except kind as exc:
        return str(exc)
    raise AssertionError(f"no {kind.__name__} from {call}")


def _group_still_works(comm, world: int) -> None:
    assert comm.all_reduce(torch.ones(2)).tolist() == [float(world)] * 2


def mesh_and_layers(rank: int, world: int) -> dict[str, str]:
    import plait

    found = {}
    saved = os.environ["PLAIT_TIMEOUT_S"]
    os.environ["PLAIT_TIMEOUT_S"] = "45" if rank == 1 else saved
    found["timeout"] = _error(lambda: plait.init_mesh(tp=world))
    os.environ["PLAIT_TIMEOUT_S"] = saved
    os.environ["PLAIT_CHECK_CALLS"] = "1" if rank == 0 else "0"
    found["check_calls"] = _error(lambda: plait.init_mesh(tp=world))
    del os.environ["PLAIT_CHECK_CALLS"]
    mesh = plait.init_mesh(tp=world)          # now they agree

    Col, Row = plait.ColumnParallelLinear, plait.RowParallelLinear
    found["col_shape"] = _error(lambda: Col(8, 8 if rank == 0 else 16))
    # rank 0's out_features does not divide over the ranks: the ranks learn of the difference together
    found["col_invalid"] = _error(lambda: Col(8, 6 if rank == 0 else 8))
    found["col_dtype"] = _error(lambda: Col(8, 8, dtype=torch.float32 if rank == 0 else torch.float64))
    found["col_activation"] = _error(lambda: Col(8, 8, activation="gelu" if rank == 0 else None))
    found["row_parallel_input"] = _error(lambda: Row(8, 8, input_is_parallel=rank == 0))
    found["row_bias"] = _error(lambda: Row(8, 8, bias=rank == 0))
    found["embedding"] = _error(lambda: plait.VocabParallelEmbedding(8 if rank == 0 else 16, 4))
    # check_ranks=False: no exchange, so a mismatch is the caller's to find (here: none raised)
    Col(8, 8 if rank == 0 else 16, check_ranks=False)
    Col(8, 8), Row(8, 8), plait.VocabParallelEmbedding(8, 4)   # agreeing ranks build as before
    _group_still_works(mesh.tp_comm, world)
    plait.destroy_mesh()
    return found


def test_mesh_and_layers_name_what_differs():
    results = run_ranks(mesh_and_layers, 2)
    assert results[0] == results[1], "every rank must raise the same message"
    found = results[0]
    expected = {
        "timeout": ["the job (plait.init_mesh)", "PLAIT_TIMEOUT_S: rank 0: 60.0, rank 1: 45.0"],
        "check_calls": ["PLAIT_CHECK_CALLS: rank 0: True, rank 1: False"],
        "col_shape": ["ColumnParallelLinear", "out_features: rank 0: 8, rank 1: 16"],
        "col_invalid": ["out_features: rank 0: 6, rank 1: 8"],
        "col_dtype": ["dtype: rank 0: torch.float32, rank 1: torch.float64"],
        "col_activation": ["activation: rank 0: 'gelu', rank 1: None"],
        "row_parallel_input": ["RowParallelLinear", "input_is_parallel: rank 0: True, rank 1: False"],
        "row_bias": ["bias: rank 0: True, rank 1: False"],
        "embedding": ["VocabParallelEmbedding", "num_embeddings: rank 0: 8, rank 1: 16"],
    }
    for case, fragments in expected.items():
        for fragment in fragments:
            assert fragment in found[case], f"{case}: {fragment!r} not in {found[case]!r}"
    assert "in_features" not in found["col_shape"], "only the differing fields are named"


def pipeline_engines(rank: int, world: int) -> dict[str, str]:
    import torch.nn.functional as F

    import plait

    mesh = plait.init_mesh(pp=world)
    stage = nn.Linear(4, 4, dtype=torch.float64)
    engine = lambda module=stage, **kw: plait.PipelineEngine(  # noqa: E731
        module, mesh, **{"schedule": "1f1b", "num_microbatches": 2, "loss_fn": F.mse_loss, **kw})
    found = {"microbatches": _error(lambda: engine(num_microbatches=2 if rank == 0 else 4)),
             "reduction": _error(lambda: engine(loss_reduction="mean" if rank == 0 else "sum")),
             "dtype": _error(lambda: engine(nn.Linear(4, 4, dtype=torch.float64 if rank == 0 else torch.float32)))}
    # A stage without parameters has no dtype to compare: it agrees with any.
    engine(stage if rank == 0 else nn.Tanh())
    ok = engine()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    assert torch.isfinite(ok.train_step(x, y))
    plait.destroy_mesh()
    return found


def test_pipeline_engine_ranks_must_agree():
    results = run_ranks(pipeline_engines, 2)
    assert results[0] == results[1]
    found = results[0]
    assert "ranks disagree on the PipelineEngine" in found["microbatches"]
    assert "num_microbatches: rank 0: 2, rank 1: 4" in found["microbatches"]
    assert "loss_reduction: rank 0: 'mean', rank 1: 'sum'" in found["reduction"]
    assert "parameter dtype: rank 0: 'torch.float64', rank 1: 'torch.float32'" in found["dtype"]


def mismatched_calls(rank: int, world: int) -> dict[str, str]:
    from plait.errors import CommError

    import plait

    mesh = plait.init_mesh(tp=world)
    comm = mesh.tp_comm
    assert comm.check_calls, "PLAIT_CHECK_CALLS=1 turns the check on"
    found = {
        "shape": _error(lambda: comm.all_reduce(torch.ones(3 + rank)), CommError),
        "op": _error(lambda: comm.all_reduce(torch.ones(3), op="sum" if rank == 0 else "max"), CommError),
        "dtype": _error(lambda: comm.all_gather(torch.ones(2, dtype=torch.float32 if rank == 0 else torch.float64)),
                        CommError),
        "src": _error(lambda: comm.broadcast(torch.ones(2), src=rank), CommError),
        "dim": _error(lambda: comm.reduce_scatter(torch.ones(2, 2), dim=rank), CommError),
    }
    torch.manual_seed(0)
    row = plait.RowParallelLinear(8, 8)
    found["row_layer"] = _error(lambda: row(torch.ones(3 + rank, 4)), CommError)
    # Nothing moved: the group is intact, and agreeing calls give the right results.
    _group_still_works(comm, world)
    assert comm.all_gather(torch.full((1,), float(rank))).tolist() == [0.0, 1.0]
    assert row(torch.ones(3, 4)).shape == (3, 8)
    plait.destroy_mesh()
    return found


def test_mismatched_collectives_fail_on_every_rank_with_check_calls():
    results = run_ranks(mismatched_calls, 2, env={"PLAIT_CHECK_CALLS": "1"})
    for rank, found in enumerate(results):
        for message in found.values():
            assert f"rank {rank} of group 'tp'" in message and "the ranks called different collectives" in message
    found = results[1]
    assert "rank 0: all_reduce(float32[3], op=sum), rank 1: all_reduce(float32[4], op=sum)" in found["shape"]
    assert "op=max" in found["op"]
    assert "rank 0: all_gather(float32[2], dim=0), rank 1: all_gather(float64[2], dim=0)" in found["dtype"]
    assert "src=0" in found["src"] and "src=1" in found["src"]
    assert "dim=0" in found["dim"] and "dim=1" in found["dim"]
    assert "all_reduce(float32[3, 8], op=sum)" in found["row_layer"] and "[4, 8]" in found["row_layer"]


def test_check_calls_setting(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PLAIT_CHECK_CALLS", raising=False)
    assert check_calls_enabled("gloo") is False           # measured: over 5% of a call (bench check_calls)
    monkeypatch.setenv("PLAIT_CHECK_CALLS", "1")
    assert check_calls_enabled("gloo") and check_calls_enabled("nccl")
    monkeypatch.setenv("PLAIT_CHECK_CALLS", "0")
    assert not check_calls_enabled("gloo")
    monkeypatch.setenv("PLAIT_CHECK_CALLS", "yes")
    with pytest.raises(ValueError, match="PLAIT_CHECK_CALLS='yes'"):
        check_calls_enabled("gloo")


def test_disagreements_lists_only_differing_fields():
    ranks = [{"a": "1", "b": "2", "c": "None"}, {"a": "1", "b": "3", "c": "'x'"}]
    assert disagreements(ranks) == ["b: rank 0: 2, rank 1: 3", "c: rank 0: None, rank 1: 'x'"]
    assert disagreements(ranks, optional=("c",)) == ["b: rank 0: 2, rank 1: 3"]
    assert disagreements([{"a": "1"}, {"a": "1"}]) == []
