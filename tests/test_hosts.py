"""The test-host fixture (tests/hosts.py): separate hostnames, addresses, /dev/shm and host keys;
traffic only between the hosts; cut links, killed hosts and a clean tear-down."""
import subprocess
import sys
import time

import pytest

from hosts import HostCommandFailed, TestHosts

PY = sys.executable


def host_facts(rank: int, world: int) -> dict:
    import socket

    import torch
    import torch.distributed as dist

    from plait.comm.rendezvous import hosts_of_group, host_key
    from plait.comm.torch_backend import TorchCommunicator

    dist.init_process_group("gloo")
    x = torch.full((3,), float(rank + 1))
    dist.all_reduce(x)
    keys = hosts_of_group(TorchCommunicator())
    dist.destroy_process_group()
    return {"hostname": socket.gethostname(), "key": host_key(), "keys": keys, "sum": x.tolist()}


def test_hosts_are_separate_machines(make_hosts):
    hosts = make_hosts(2)
    assert [h.name for h in hosts] == ["host0", "host1"] and hosts.master_addr == hosts[0].addr
    assert hosts[0].addr != hosts[1].addr and hosts[0].addr.rsplit(".", 1)[0] == hosts.gateway.rsplit(".", 1)[0]
    facts = hosts.run_ranks(host_facts, 2)
    assert [f["hostname"] for f in facts] == ["host0", "host0", "host1", "host1"]
    assert facts[0]["sum"] == [10.0] * 3
    keys = facts[0]["keys"]
    assert keys[0] == keys[1] != keys[2] == keys[3] and all(f["keys"] == keys for f in facts)
    # each host has its own /dev/shm: a file made on one is not seen on the other
    hosts[0].run(["touch", "/dev/shm/only-on-host0"])
    assert "only-on-host0" in hosts[0].shm_files() and "only-on-host0" not in hosts[1].shm_files()
    # names resolve on every host, as on a cluster
    assert hosts[1].run(["getent", "hosts", "host0"]).stdout.split()[0] == hosts[0].addr


def connect(addr: str, port: int = 9) -> str:
    return (f"import socket\ntry:\n    socket.create_connection(({addr!r}, {port}), timeout=2)\n    print('open')\n"
            f"except OSError as e:\n    print(type(e).__name__, e.errno)")


def test_traffic_stays_between_hosts_and_cut_links(make_hosts):
    hosts = make_hosts(2)
    server = hosts[1].popen([PY, "-c", "import socket; s = socket.create_server(('0.0.0.0', 7000)); print('up', "
                                       "flush=True); c, _ = s.accept(); c.sendall(b'hello'); c.close()"],
                            stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "up"
    got = hosts[0].run([PY, "-c", f"import socket; print(socket.create_connection(({hosts[1].addr!r}, 7000), "
                                  f"timeout=5).recv(5).decode())"])
    assert got.stdout.strip() == "hello"
    server.wait(timeout=10)
    # no route off the bridge: the outside world is unreachable
    assert hosts[0].run([PY, "-c", connect("1.1.1.1", 80)]).stdout.startswith("OSError 101")
    hosts.cut(1)
    assert hosts[0].run([PY, "-c", connect(hosts[1].addr)]).stdout.strip() in ("TimeoutError None",
                                                                                 "OSError 113")
    hosts.restore(1)
    assert hosts[0].run([PY, "-c", connect(hosts[1].addr)]).stdout.startswith("ConnectionRefusedError")


def test_kill_ends_every_process_of_a_host_and_close_cleans_up():
    from plait.bench._hosts import _ip

    try:
        hosts = TestHosts(2).__enter__()
    except Exception as exc:  # HostsUnavailable
        pytest.skip(f"test hosts unavailable: {exc}")
    try:
        parent = hosts[1].popen(["sh", "-c", "sleep 300 & sleep 300 & wait"])
        other = hosts[0].popen(["sleep", "300"])
        deadline = time.monotonic() + 10
        while len(hosts[1].pids()) < 4 and time.monotonic() < deadline:  # anchor, sh and two sleeps
            time.sleep(0.05)
        assert len(hosts[1].pids()) == 4
        hosts[1].kill()
        assert hosts[1].pids() == [] and parent.poll() == -9 and not hosts[1].alive
        assert other.poll() is None
        with pytest.raises(HostCommandFailed, match="host1 .* is not running"):
            hosts[1].popen(["true"])
    finally:
        hosts.close()
    assert other.poll() == -9
    assert not any(h.netns in _ip("netns", "list").stdout for h in hosts)
    assert hosts.bridge not in _ip("-o", "link").stdout
