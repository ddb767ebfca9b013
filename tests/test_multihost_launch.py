"""The pieces of a multi-host launch that need no second host: the layout rule that keeps TP inside a
host, the node flags and their rank blocks, the judge of lost hosts (on a real TCPStore, in this
process), the interface gloo is pointed at, and plait's own launcher for two nodes on loopback."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pytest

from plait.config import ParallelConfig
from plait.nodes import NodeSpec, add_node_options, choose_gloo_interface, interface_of, node_from_args


def test_tp_groups_must_stay_inside_a_host():
    two_by_two = ["a", "a", "b", "b"]
    ParallelConfig(dp=2, tp=2).check_hosts(two_by_two)          # dp across hosts, tp inside
    ParallelConfig(pp=2, tp=2).check_hosts(two_by_two)          # pp across hosts
    ParallelConfig(dp=4).check_hosts(two_by_two)
    with pytest.raises(ValueError, match=r"tp=4 puts TP group ranks 0-3 on 2 hosts \(a: ranks 0-1; b: ranks "
                                         r"2-3\).*divides the ranks per host \(2\).*tp_across_hosts"):
        ParallelConfig(tp=4).check_hosts(two_by_two)
    with pytest.raises(ValueError, match=r"TP group ranks 0-1 on 2 hosts \(a: ranks 0; b: ranks 1\)"):
        ParallelConfig(dp=2, tp=2).check_hosts(["a", "b", "a", "b"])   # hosts' ranks interleaved
    ParallelConfig(tp=4, tp_across_hosts=True).check_hosts(two_by_two)
    with pytest.raises(ValueError, match="tp_across_hosts must be True or False"):
        ParallelConfig(tp_across_hosts="yes")
    with pytest.raises(ValueError, match="3 hosts given for 4 ranks"):
        ParallelConfig(tp=4).check_hosts(["a", "a", "a"])


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_node_options(parser)
    return parser.parse_args(argv)


def test_node_flags_and_rank_blocks(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    node = node_from_args(_parse(["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1"]))
    assert node == NodeSpec(2, 1, "10.0.0.1", 29500)
    assert node.local_ranks(8) == range(4, 8)
    assert node_from_args(_parse([])) == NodeSpec()              # one host: a free local port later
    with pytest.raises(ValueError, match="6 ranks do not split evenly over --nnodes 4"):
        NodeSpec(4, 0, "h", 1).local_ranks(6)
    with pytest.raises(ValueError, match=r"--node-rank 2 is outside 0..1"):
        NodeSpec(2, 2, "h", 1)
    with pytest.raises(ValueError, match="--nnodes 2 needs --master-addr"):
        node_from_args(_parse(["--nnodes", "2", "--node-rank", "1"]))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="under torchrun .* give those settings to torchrun"):
        node_from_args(_parse(["--nnodes", "2", "--master-addr", "h"]))
    with pytest.raises(SystemExit):
        _parse(["--master-port", "70000"])


def test_plait_train_refuses_tp_across_nodes_before_starting(capsys, tmp_path):
    from plait.cli import main

    argv = ["train", "--gpt", "gpt-tiny,vocab=64", "--data", str(tmp_path / "none.bin"), "--seq", "8",
            "--global-batch", "4", "--tp", "4", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.9.9.9"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tp=4 puts TP group ranks 0-3 on 2 hosts (node 0: ranks 0-1; node 1: ranks 2-3)" in err, err
    assert main(argv[:-6] + ["--dp", "2", "--tp", "2", "--nnodes", "3", "--master-addr", "h"]) == 2
    assert "4 ranks do not split evenly over --nnodes 3" in capsys.readouterr().err


def test_gloo_interface_follows_the_route_to_the_master(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    assert interface_of("127.0.0.1") == "lo"
    assert choose_gloo_interface("127.0.0.1") is None and "GLOO_SOCKET_IFNAME" not in os.environ   # one host
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    assert choose_gloo_interface("10.1.2.3") == "eth7"          # the user's choice wins


def test_the_judge_names_the_host_that_stopped():
    """Four ranks' watches on one store: all beating; host b's two stop without a word (lost); they stop with a
    note (not lost); the store goes away (its host named, or this host's network)."""
    import torch.distributed as dist

    from plait.hostwatch import HostMap, HostWatch
    from plait.launch import free_port

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    hosts = HostMap(["a", "a", "b", "b"], ["127.0.0.1", "127.0.0.1", "10.0.0.2", "10.0.0.2"], "test")
    watches = [HostWatch(hosts, rank, "127.0.0.1", port) for rank in range(4)]
    try:
        assert watches[0].lost_hosts() is None
        for rank in (2, 3):
            watches[rank].close()                                 # no note: as if the host vanished
        assert watches[1].lost_hosts() == "lost host b (10.0.0.2; ranks 2-3): its ranks stopped answering"
        for rank in (2, 3):
            watches[rank].close("stopped after an error")         # they said why: not lost
        assert watches[0].lost_hosts() is None
        del store                                                 # the store's host is gone
        start = time.monotonic()
        lost = watches[3].lost_hosts()
        assert lost.startswith("lost host a (127.0.0.1; ranks 0-1), or this host's network: the job's store there "
                               f"(127.0.0.1:{port}) does not answer"), lost
        assert time.monotonic() - start < 10
    finally:
        for watch in watches:
            watch.close()


@pytest.mark.slow
def test_plait_train_two_nodes_on_loopback(tmp_path):
    """plait's own launcher, two nodes of one rank each on this host (dp=2): both exit 0 and node 0 prints the
    losses of the one-process job."""
    pytest.importorskip("transformers")
    import numpy as np

    from hf_models import VOCAB, save_tiny
    from plait.launch import free_port

    save_tiny("llama", tmp_path / "model")
    np.random.default_rng(0).integers(0, VOCAB, 7 * 8 + 1).astype(np.uint16).tofile(tmp_path / "data.bin")
    common = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.bin"), "--seq", "8",
              "--global-batch", "4", "--steps", "2", "--dtype", "float64", "--lr-schedule", "constant", "--json"]
    single = subprocess.run([sys.executable, "-m", "plait", "train", *common], capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "plait", "train", *common, "--dp", "2", "--nnodes", "2",
                               "--node-rank", str(i), "--master-addr", "127.0.0.1", "--master-port", port],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert outs[1][0] == ""                                       # node 0 reports
    import json

    losses = [[json.loads(line)["loss"] for line in out.splitlines() if '"step"' in line]
              for out in (single.stdout, outs[0][0])]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-9, abs=0)
