"""Bad input raises ValueError on every rank before any collective, so nobody is left waiting."""
import pytest
import torch

from plait.launch import run_ranks


def _expect(call, *fragments) -> str:
    with pytest.raises(ValueError) as info:
        call()
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    return text


def bad_inputs(rank: int, world: int) -> int:
    import plait

    plait.init_mesh(tp=world)
    Col, Row = plait.ColumnParallelLinear, plait.RowParallelLinear
    cases = [
        (lambda: Col(8, 6), "out_features=6", "multiple of 4"),
        (lambda: Col(0, 8), "in_features must be a whole number >= 1, got 0"),
        (lambda: Row(8, -4), "out_features must be a whole number >= 1, got -4"),
        (lambda: Row(8.0, 8), "in_features must be a whole number >= 1, got 8.0"),
        (lambda: plait.VocabParallelEmbedding(-8, 4), "num_embeddings must be a whole number >= 1"),
        (lambda: Row(6, 8), "in_features=6"),
        (lambda: plait.VocabParallelEmbedding(10, 4), "vocab_size=10"),
        (lambda: Col(8, 8, overlap="sometimes"), "unknown overlap"),
        (lambda: Col(8, 8, overlap="fused")(torch.ones(3, 8)), "overlap='fused' runs on CUDA"),
        (lambda: Row(8, 8, overlap="fused")(torch.ones(3, 2)), "overlap='fused' runs on CUDA"),
        (lambda: plait.tp.fused.ipc_communicator(plait.current_mesh().tp_comm), "CUDA IPC communicator"),
        (lambda: Col(8, 8, activation="tanhh"), "unknown activation"),
        (lambda: Col(8, 8, gather_output=True, sequence_parallel=True), "gather_output"),
        (lambda: Row(8, 8, input_is_parallel=False, sequence_parallel=True), "input_is_parallel"),
        (lambda: Col(8, 8, overlap_chunks=0), "overlap_chunks"),
        (lambda: Col(8, 8)(torch.ones(3, 7)), "[..., 8]"),
        (lambda: Col(8, 8)(torch.ones(3, 8, dtype=torch.float64)), "dtype"),
        (lambda: Col(8, 8)(torch.ones(3, 8, device="meta")), "meta"),
        (lambda: Col(8, 8, sequence_parallel=True)(torch.ones(8)), "sequence shard"),
        (lambda: Row(8, 8)(torch.ones(3, 8)), "[..., 2]"),
        (lambda: Row(8, 8, sequence_parallel=True)(torch.ones(5, 2)), "multiple of 4"),
        (lambda: Row(8, 8, input_is_parallel=False)(torch.ones(3, 2)), "[..., 8]"),
        (lambda: plait.VocabParallelEmbedding(8, 4)(torch.ones(3)), "integer"),
        (lambda: plait.VocabParallelEmbedding(8, 4)(torch.tensor([0, 8])), "[0, 8)"),
        (lambda: plait.VocabParallelEmbedding(8, 4, sequence_parallel=True)(torch.zeros(6, dtype=torch.long)),
         "sequence"),
        (lambda: plait.vocab_parallel_cross_entropy(torch.ones(3, 2), torch.zeros(4, dtype=torch.long)),
         "target shape"),
        (lambda: plait.vocab_parallel_cross_entropy(torch.ones(3, 2), torch.full((3,), 8)), "[0, 8)"),
        (lambda: plait.vocab_parallel_cross_entropy(torch.ones(3, 2), torch.zeros(3, dtype=torch.long),
                                                    reduction="avg"), "reduction"),
    ]
    for call, *fragments in cases:
        _expect(call, *fragments)
    # Every rank raised without communicating: the group still works.
    comm = plait.current_mesh().tp_comm
    assert comm.all_reduce(torch.ones(1)).item() == world
    plait.destroy_mesh()
    return len(cases)


def test_bad_input_is_rejected_without_hanging():
    assert run_ranks(bad_inputs, 4) == [28] * 4
