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


def test_table_pairs_backends_per_size_with_ratios_to_deepspeed_and_copy():
    rows = [{"op": "all_reduce", "ranks": 2, "dtype": "float32", "bytes": 65536, "backend": b, "latency_us": us,
             "p99_us": p99, "busbw_GBps": 0.0, **({"path": "shm"} if b == "deepspeed" else {})}
            for b, us, p99 in (("gloo", 1800.0, 2500.0), ("shm", 20.0, 30.0), ("deepspeed", 40.0, 120.0),
                               ("copy", 4.0, 5.0))]
    table = comm.table(rows)
    row = dict(zip(table["columns"], table["rows"][0]))
    assert (row["size"], row["gloo us"], row["shm us"], row["DeepSpeed us"]) == ("64K", 1800.0, 20.0, 40.0)
    assert row["shm speedup vs gloo"] == 90.0 and row["shm/DeepSpeed"] == 0.5 and row["shm/DeepSpeed p99"] == 0.25
    assert row["DeepSpeed path"] == "shm" and row["shm/copy"] == 5.0


def test_targets_compare_median_and_p99_with_deepspeed_at_the_issue_sizes(monkeypatch):
    def row(ranks, nbytes, backend, us, p99):
        return {"op": "all_reduce", "ranks": ranks, "dtype": "float32", "bytes": nbytes, "backend": backend,
                "latency_us": us, "p99_us": p99, **({"path": "shm"} if backend == "deepspeed" else {})}

    rows = [row(2, 4096, "shm", 3.0, 6.0), row(2, 4096, "deepspeed", 5.0, 10.0),      # 0.6 and 0.6: met
            row(2, 1 << 20, "shm", 80.0, 400.0), row(2, 1 << 20, "deepspeed", 100.0, 300.0),  # 0.8 > 0.7
            row(2, 16384, "shm", 9.0, 9.0), row(2, 16384, "deepspeed", 1.0, 1.0),    # no bound at 16K
            row(4, 4096, "shm", 30.0, 90.0), row(4, 4096, "gloo", 2000.0, 3000.0),
            row(4, 1 << 25, "shm", 9000.0, 9000.0), row(4, 1 << 25, "gloo", 8000.0, 9000.0)]
    monkeypatch.setattr(comm.os, "sched_getaffinity", lambda pid: {0, 1})
    goals = comm.targets(rows)
    assert goals["median 4K float32 2 ranks"] == {"value": 0.6, "target": 0.7, "met": True,
                                                  "of": "plait shm / DeepSpeed (shm)"}
    assert goals["p99 4K float32 2 ranks"]["met"] is True
    assert goals["median 1M float32 2 ranks"]["met"] is False and "p99 1M float32 2 ranks" not in goals
    assert not any("16K" in name for name in goals)
    # 4 ranks on 2 cores: the worst size against gloo decides (32M: 9000 / 8000)
    assert goals["slowest shm / gloo float32 4 ranks on 2 cores"] == {
        "value": 1.125, "target": 1.0, "met": False, "of": "plait shm / gloo median, the worst size"}


def test_table_leaves_missing_backends_empty():
    rows = [{"op": "all_gather", "ranks": 2, "bytes": 4096, "backend": b, "latency_us": us, "p99_us": us,
             "busbw_GBps": 0.0} for b, us in (("gloo", 100.0), ("shm", 10.0))]
    row = dict(zip(*(lambda t: (t["columns"], t["rows"][0]))(comm.table(rows))))
    assert row["dtype"] == "float32" and row["DeepSpeed us"] is None and row["shm/DeepSpeed"] is None


def test_tiny_run_measures_every_backend_and_checks_results(capsys):
    assert comm.main(["--ranks", "2", "--sizes", "4K", "--dtypes", "float32", "bfloat16", "--trials", "1",
                      "--trial-s", "0.005", "--no-deepspeed", "--no-save"]) == 0
    out = capsys.readouterr().out
    assert "shm/DeepSpeed" in out and "copy us" in out
    assert "all_reduce      2  bfloat16    4K" in out and "all_reduce      2   float32    4K" in out


def hosts_row(hosts, nbytes, backend, us):
    return {"op": "all_reduce", "hosts": hosts, "ranks": 2 * hosts, "dtype": "float32", "bytes": nbytes,
            "backend": backend, "latency_us": us, "p99_us": 2 * us}


def test_hosts_table_and_targets_pair_hier_with_flat_gloo():
    from plait.bench import _comm_hosts

    rows = [hosts_row(2, 4096, "gloo", 5000.0), hosts_row(2, 4096, "hier", 1000.0),
            hosts_row(2, 1 << 20, "gloo", 6000.0), hosts_row(2, 1 << 20, "hier", 2000.0),
            hosts_row(2, 16 << 20, "gloo", 40000.0), hosts_row(2, 16 << 20, "hier", 25000.0)]
    table = _comm_hosts.table(rows)
    first = dict(zip(table["columns"], table["rows"][0]))
    assert (first["size"], first["ranks per host"], first["gloo us"], first["hier us"]) == ("4K", 2, 5000.0, 1000.0)
    assert first["hier speedup vs gloo"] == 5.0 and first["gloo p99 us"] == 10000.0
    goals = _comm_hosts.targets(rows)
    assert goals["slowest speedup from 1M, float32 2 hosts x 2 ranks"] == {
        "value": 1.6, "target": 2.0, "met": False, "of": "gloo / hier median, the worst size from 1 MB up"}
    assert goals["slowest speedup at any size, float32 2 hosts x 2 ranks"]["met"] is True


@pytest.mark.slow
def test_tiny_run_across_two_test_hosts(capsys):
    from plait.bench._hosts import unavailable_reason

    if unavailable_reason():
        pytest.skip(f"test hosts unavailable: {unavailable_reason()}")
    assert comm.main(["--hosts", "2", "--sizes", "4K", "12K", "--trials", "1", "--trial-s", "0.005",
                      "--no-save"]) == 0
    out = capsys.readouterr().out
    assert "hier speedup vs gloo" in out and "all_reduce      2               2  float32    4K" in out
    assert "12K" in out
