"""ColumnParallelLinear / RowParallelLinear against nn.Linear on 1, 2 and 4 gloo ranks."""
import pytest

from plait.launch import run_ranks
from tp_reference import run_layer_cases, train_mlp


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_layers_match_dense(tp):
    counts = run_ranks(run_layer_cases, tp)
    assert counts[0] > 40


@pytest.mark.parametrize("overlap,sp", [("none", False), ("chunked", False), ("none", True), ("chunked", True)])
def test_mlp_trains_like_dense(overlap, sp):
    assert run_ranks(train_mlp, 2, overlap, sp) == [3, 3]


def test_mlp_tp4_chunked_sp():
    assert run_ranks(train_mlp, 4, "chunked", True) == [3] * 4


def test_row_ranges_cover_rows_in_order():
    from plait.tp.overlap import num_chunks, row_ranges

    for rows in (1, 2, 7, 37, 64, 1000):
        for chunks in (1, 2, 3, 4, 9):
            ranges = row_ranges(rows, chunks)
            assert ranges[0][0] == 0 and ranges[-1][1] == rows
            assert all(a < b for a, b in ranges)
            assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1 and len(ranges) == min(chunks, rows)
    assert num_chunks(37, 4) == 2 and num_chunks(15, 4) == 1 and num_chunks(10_000, 4) == 4
