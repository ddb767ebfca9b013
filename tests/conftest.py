"""Test-wide defaults, set before any test module imports torch or triton.

- A short collective timeout, so a broken test fails instead of hanging.
- Without a CUDA GPU, Triton kernels run on the interpreter (it must be chosen
  before triton is imported).
"""
import os

os.environ.setdefault("PLAIT_TIMEOUT_S", "60")

import torch  # noqa: E402  (torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ---------------------------------------------------------------- shared memory leaks
# Segments created by this session's ranks carry this job token in their names
# (/dev/shm/plait-<job>-...; see plait.comm.shm_config), so the check below sees only
# this session's, even while other test runs share the machine.
import pathlib  # noqa: E402

import pytest  # noqa: E402

SHM_JOB = os.environ.setdefault("PLAIT_SHM_JOB", f"pytest{os.getpid()}")


def leftover_shm_segments() -> list[str]:
    """Names of this session's plait segments still present in /dev/shm."""
    return sorted(p.name for p in pathlib.Path("/dev/shm").glob(f"plait-{SHM_JOB}-*"))


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when a plait shared-memory segment outlived the processes that made it."""
    left = leftover_shm_segments()
    if left:
        for name in left:
            (pathlib.Path("/dev/shm") / name).unlink(missing_ok=True)
        print(f"\nERROR: {len(left)} plait shared-memory segment(s) were left in /dev/shm: {left} "
              f"(removed now); every segment must be unlinked once all ranks attached")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ---------------------------------------------------------------- test hosts
@pytest.fixture
def make_hosts():
    """``make_hosts(n)``: n test hosts (tests/hosts.py), removed after the test; skips with the reason
    where this machine cannot make them (not root, namespaces refused)."""
    from hosts import HostsUnavailable, TestHosts

    made = []

    def make(n: int, name_prefix: str = "host") -> "TestHosts":
        hosts = TestHosts(n, name_prefix)
        try:
            hosts.__enter__()
        except HostsUnavailable as exc:
            pytest.skip(f"test hosts unavailable: {exc}")
        made.append(hosts)
        return hosts

    yield make
    for hosts in made:
        hosts.close()
