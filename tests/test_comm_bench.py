"""bench/comm.py: sizes, bus-bandwidth factors, the table, and one tiny real run."""
import pytest

from plait.bench import comm


def test_sizes_and_labels():
    assert [comm.parse_size(s) for s in ("4096", "64K", "32M")] == [4096, 65536, 32 << 20]
    assert [comm.label(n) for n in (1024, 3 << 20, 1000)] == ["1K", "3M", "1000"]
    with pytest.raises(Exception, match="not a size"):
        comm.parse_size("lots")


def test_bus_bandwidth_factors_follow_nccl_tests():
    assert comm.bus_factor("all_reduce", 4) == 1.5 and comm.bus_factor("all_gather", 4) == 0.75
    assert comm.bus_factor("broadcast", 8) == 1.0


def test_table_pairs_backends_per_size():
    rows = [{"op": "all_reduce", "ranks": 2, "bytes": 65536, "backend": b, "latency_us": us, "busbw_GBps": bw}
            for b, us, bw in (("gloo", 1800.0, 0.04), ("shm", 20.0, 3.3))]
    table = comm.table(rows)
    assert table["rows"] == [["all_reduce", 2, "64K", 1800.0, 20.0, 90.0, 0.04, 3.3]]


def test_tiny_run_measures_both_backends(capsys):
    assert comm.main(["--ranks", "2", "--sizes", "4K", "--trials", "1", "--trial-s", "0.01", "--no-save"]) == 0
    out = capsys.readouterr().out
    assert "shm speedup" in out and "all_reduce      2    4K" in out
