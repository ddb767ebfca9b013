"""Stale-segment reclaiming (plait.comm.shm_reclaim): only plait names whose creator has ended."""
import os
import subprocess
import sys

from plait.comm.shm_config import creator_pid, segment_name
from plait.comm.shm_reclaim import process_gone, reclaim_stale_segments


def ended_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_names_carry_the_creators_pid():
    name = segment_name([0, 1])
    assert creator_pid(name) == os.getpid() and creator_pid(name.lstrip("/")) == os.getpid()
    assert creator_pid(segment_name(list(range(64)))) == os.getpid()
    assert creator_pid("plait-job-g0_1-abcdef") is None and creator_pid("deepspeed_allreduce_0") is None


def test_reclaims_only_plait_segments_of_ended_creators(tmp_path):
    gone = ended_pid()
    assert process_gone(gone) and not process_gone(os.getpid())
    stale = tmp_path / f"plait-job-p{gone}-g0_1-0123456789ab"
    live = tmp_path / f"plait-job-p{os.getppid()}-g0_1-0123456789ab"
    mine = tmp_path / segment_name([0, 1]).lstrip("/")
    foreign = tmp_path / f"plait-notours-{gone}"
    for path in (stale, live, mine, foreign):
        path.write_bytes(b"")
    assert reclaim_stale_segments(tmp_path) == [stale.name]
    assert not stale.exists() and live.exists() and mine.exists() and foreign.exists()
