"""Ranks started by plait.launch end when the process that started them dies (no orphaned ranks)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PARENT = """
import sys, time
from plait.launch import start_ranks
from test_launch_orphans import wait_forever
procs, _ = start_ranks(wait_forever, 2)
print(" ".join(str(p.pid) for p in procs), flush=True)
time.sleep(600)
"""


def wait_forever(rank: int, world: int) -> None:
    time.sleep(600)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_ranks_exit_when_their_parent_is_killed():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, env=env)
    try:
        ranks = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(ranks) == 2 and all(_alive(pid) for pid in ranks)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in ranks), "ranks outlived the process that started them"
    finally:
        parent.kill()
