"""Test hosts: N separate "machines" on this one, for multi-host tests and benchmarks.

Each host is a set of Linux namespaces, so plait (and torch) see it exactly as a machine
of its own:

- a **network namespace** with one interface ``eth0`` (a veth pair to a bridge in the
  root namespace) holding the host's own address in a private /24 (``10.77.X.0/24``,
  ``X`` chosen free per fixture), plus ``lo``. There is no default route: a host reaches
  only the other hosts, the test process (``hosts.gateway``, the bridge's address) and
  its own loopback. Ports are per host, so fixed ports (``hosts.master_port``) never
  collide with other tests;
- a **UTS namespace**: its own hostname (``host0``, ``host1``, ...); every host's
  ``/etc/hosts`` maps all host names to their addresses (gloo finds its interface by
  resolving the hostname, as on a real cluster);
- a **mount namespace** with a private tmpfs on ``/dev/shm``, so plait's host key
  (:func:`plait.comm.rendezvous.host_key`: hostname, boot id, /dev/shm identity) differs
  between hosts and shared memory cannot cross them. Everything else (the checkout, the
  venv, ``/tmp``) is the same files on every host, like a shared filesystem.

A host's processes are found through its network namespace (``ip netns pids``), so
:meth:`Host.kill` ends all of them, children included, like a machine losing power;
:meth:`TestHosts.cut` takes a host's link down (its processes live on but nothing
reaches them: the lost-network case).

API::

    from plait.bench._hosts import TestHosts   # tests: `from hosts import TestHosts` (tests/hosts.py)
    with TestHosts(2) as hosts:            # raises HostsUnavailable (a reason) where namespaces are not allowed
        env = {"MASTER_ADDR": hosts.master_addr, "MASTER_PORT": str(hosts.master_port)}
        procs = [hosts[i].popen(["torchrun", "--nnodes=2", f"--node-rank={i}", ...], env=env)
                 for i in range(len(hosts))]
        hosts[1].addr, hosts[1].name       # "10.77.3.2", "host1"
        hosts[0].run(["hostname"])         # CompletedProcess (text, captured), bounded by a timeout
        hosts.cut(1); hosts.restore(1)     # link down / up
        hosts[1].kill()                    # SIGKILL every process of host 1 (the host is then dead)
        hosts.run_ranks(fn, 2, *args)      # fn(rank, world_size, *args) on 2 ranks per host, results by rank

``popen``/``run`` take ``env`` as variables *added to* ``os.environ`` (``None``: as is)
and any other :class:`subprocess.Popen` keyword; the working directory defaults to the
current one. The pytest fixture ``make_hosts`` (tests/conftest.py) makes hosts, skips with
the reason where they cannot be made, and tears them down after the test. The module lives in
plait.bench so that ``plait bench comm --hosts 2`` runs from an installed package too.

Leaving: namespaces, veths, the bridge, every process in a host and the temporary files
go on ``close()``/``__exit__``, also when the test failed, and at interpreter exit.
Leftovers of a test process that was killed outright (their names carry its pid) are
removed by the next fixture. Needs root, ``ip`` (iproute2), ``unshare`` and ``nsenter``.
"""
from __future__ import annotations

import atexit
import fcntl
import itertools
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from plait.comm.shm_reclaim import process_gone

PREFIX = "plaith"        # network namespaces: plaith-<pid>-<fixture>-<host>
BRIDGE = "plb"           # bridges: plb<pid hex>-<fixture>
VETH = "plv"             # root ends of the veths: plv<pid hex>-<fixture>-<host>
SUBNET = "10.77"         # hosts get 10.77.X.1, .2, ...; the bridge 10.77.X.254
MASTER_PORT = 29500      # free on every host: each has its own ports
LOCK = Path("/run/lock/plait-testhosts.lock")
# a run_ranks rank: python -c RANK_MAIN JOB_DIR PATHS... (PATHS: where the function's module imports from)
RANK_MAIN = ("import sys; sys.path[:0] = sys.argv[2:]; "
             "from plait.bench._hosts import _rank_main; _rank_main(sys.argv[1])")
_counter = itertools.count()


class HostsUnavailable(RuntimeError):
    """Test hosts cannot be made here (not root, tools missing, namespaces refused); says why."""


class HostCommandFailed(RuntimeError):
    """A command run in a host failed, timed out or a rank of run_ranks did not finish."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, ["ip", *args], proc.stdout, proc.stderr)
    return proc


def unavailable_reason() -> Optional[str]:
    """Why test hosts cannot be made here, or None when they probably can."""
    if sys.platform != "linux":
        return f"test hosts need Linux namespaces; this is {sys.platform}"
    if os.geteuid() != 0:
        return "test hosts need root (network namespaces, veth pairs, a bridge, tmpfs mounts)"
    missing = [tool for tool in ("ip", "unshare", "nsenter") if shutil.which(tool) is None]
    if missing:
        return f"test hosts need {', '.join(missing)} (iproute2 / util-linux) on PATH"
    return None


def _netns_pids(netns: str) -> list[int]:
    out = _ip("netns", "pids", netns, check=False).stdout
    return [int(p) for p in out.split()]


def _kill_netns(netns: str, deadline_s: float = 10.0) -> None:
    """SIGKILL every process in a network namespace until none is left (they may be forking)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        pids = _netns_pids(netns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def remove_stale() -> None:
    """Remove namespaces, bridges and veths left by test processes that no longer exist."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{PREFIX}-(\d+)-\d+-\d+", name)
        if match and process_gone(int(match.group(1))):
            _kill_netns(name)
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        match = re.match(rf"\d+: (({BRIDGE}|{VETH})([0-9a-f]+)-[\d-]+)[@:]", line)
        if match and process_gone(int(match.group(3), 16)):
            _ip("link", "del", match.group(1), check=False)


def _free_subnet() -> int:
    """The X of a 10.77.X.0/24 that no interface of the root namespace uses (call under LOCK)."""
    used = {int(x) for x in re.findall(rf"inet {re.escape(SUBNET)}\.(\d+)\.", _ip("-4", "-o", "addr").stdout)}
    for x in range(256):
        if x not in used:
            return x
    raise HostsUnavailable(f"every {SUBNET}.X.0/24 is in use in the root namespace")


class Host:
    """One test host: its name, address and a way to run commands in it."""

    def __init__(self, index: int, name: str, addr: str, netns: str, veth: str) -> None:
        self.index = index
        self.name = name
        self.addr = addr
        self.netns = netns
        self.veth = veth
        self._anchor: Optional[subprocess.Popen] = None   # holds the UTS and mount namespaces
        self._procs: list[subprocess.Popen] = []

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.addr})"

    @property
    def alive(self) -> bool:
        """Whether the host still runs (its anchor process lives: not killed)."""
        return self._anchor is not None and self._anchor.poll() is None

    def _enter(self, cwd: Optional[str]) -> list[str]:
        if not self.alive:
            raise HostCommandFailed(f"host {self.name} ({self.addr}) is not running (killed or closed)")
        return ["nsenter", f"--target={self._anchor.pid}", "--net", "--uts", "--mount",
                f"--wd={cwd or os.getcwd()}", "--"]

    def popen(self, cmd: Sequence[str], env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
              **kwargs: Any) -> subprocess.Popen:
        """Start ``cmd`` on this host; ``env`` is added to ``os.environ``. The Popen is the command itself
        (nsenter execs it), so ``terminate``/``wait``/``returncode`` act on it directly."""
        full_env = dict(os.environ, **(env or {}))
        proc = subprocess.Popen([*self._enter(cwd), *map(str, cmd)], env=full_env, **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, cmd: Sequence[str], env: Optional[Mapping[str, str]] = None, timeout: float = 60.0,
            check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run ``cmd`` on this host to completion (text output captured); kill it after ``timeout`` s."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = self.popen(cmd, env=env, text=True, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise HostCommandFailed(f"{list(cmd)} on host {self.name} did not finish within {timeout:g} s; "
                                    f"output:\n{out}\n{err}") from None
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check and proc.returncode:
            raise HostCommandFailed(f"{list(cmd)} on host {self.name} exited with {proc.returncode}:\n{out}\n{err}")
        return done

    def pids(self) -> list[int]:
        """Every process running on this host (its anchor included)."""
        return _netns_pids(self.netns)

    def shm_files(self) -> list[str]:
        """Names in this host's private /dev/shm (for leak checks)."""
        return sorted(self.run(["ls", "-A", "/dev/shm"]).stdout.split())

    def kill(self) -> None:
        """SIGKILL every process of this host, children included: the machine is gone."""
        _kill_netns(self.netns)
        for proc in [*self._procs, *([self._anchor] if self._anchor else [])]:
            try:
                proc.wait(timeout=10)   # reap; the kill above reached them all
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class TestHosts:
    """``n`` test hosts on a private bridge (module docstring). Use as a context manager."""

    __test__ = False  # not a pytest test class

    def __init__(self, n: int, name_prefix: str = "host") -> None:
        if n < 1:
            raise ValueError(f"TestHosts needs at least one host, got {n}")
        self.n = n
        self.name_prefix = name_prefix
        self.hosts: list[Host] = []
        self.bridge = ""
        self.gateway = ""
        self._dir: Optional[Path] = None
        self._closed = False

    # ------------------------------------------------------------------ set-up
    def __enter__(self) -> "TestHosts":
        reason = unavailable_reason()
        if reason:
            raise HostsUnavailable(reason)
        atexit.register(self.close)
        try:
            self._build()
        except BaseException as exc:
            self.close()
            if isinstance(exc, (subprocess.CalledProcessError, OSError)):
                detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else exc
                raise HostsUnavailable(f"could not make test hosts: {detail}".strip()) from exc
            raise
        return self

    def _build(self) -> None:
        token = f"{os.getpid():x}-{next(_counter)}"
        self.bridge = f"{BRIDGE}{token}"
        self._dir = Path(tempfile.mkdtemp(prefix="plait-testhosts-"))
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        with open(LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            remove_stale()
            x = _free_subnet()
            _ip("link", "add", self.bridge, "type", "bridge")
            self.gateway = f"{SUBNET}.{x}.254"
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        for i in range(self.n):
            self.hosts.append(Host(i, f"{self.name_prefix}{i}", f"{SUBNET}.{x}.{i + 1}",
                                   f"{PREFIX}-{os.getpid()}-{token.split('-')[1]}-{i}", f"{VETH}{token}-{i}"))
        hosts_file = self._dir / "hosts"
        hosts_file.write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost\n"
                              + "".join(f"{h.addr} {h.name}\n" for h in self.hosts))
        for host in self.hosts:
            self._start(host, hosts_file)

    def _start(self, host: Host, hosts_file: Path) -> None:
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _ip("link", "set", host.veth, "master", self.bridge, "up")
        _ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        script = ('hostname "$0" && mount -t tmpfs -o mode=1777 plait-test-shm /dev/shm && '
                  'mount --bind "$1" /etc/hosts && echo ready && exec sleep infinity')
        anchor = subprocess.Popen(["ip", "netns", "exec", host.netns, "unshare", "--uts", "--mount",
                                   "--propagation", "private", "--", "sh", "-c", script, host.name,
                                   str(hosts_file)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
        host._anchor = anchor
        line = anchor.stdout.readline().strip()   # "ready", or EOF when the script failed
        if line != "ready":
            anchor.wait(timeout=10)
            raise subprocess.CalledProcessError(anchor.returncode, anchor.args, line, anchor.stderr.read())
        anchor.stdout.close()
        anchor.stderr.close()

    # ------------------------------------------------------------------ use
    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    @property
    def master_addr(self) -> str:
        """Host 0's address: the rendezvous address (MASTER_ADDR, --rdzv-endpoint host)."""
        return self.hosts[0].addr

    @property
    def master_port(self) -> int:
        return MASTER_PORT

    def cut(self, index: int) -> None:
        """Take host ``index``'s link down: its processes run on, but no packet reaches or leaves it."""
        _ip("link", "set", self.hosts[index].veth, "down")

    def restore(self, index: int) -> None:
        """Bring host ``index``'s link back up after :meth:`cut`."""
        _ip("link", "set", self.hosts[index].veth, "up")

    def run_ranks(self, fn: Callable, ranks_per_host: "int | Sequence[int]", *args: Any,
                  env: Optional[Mapping[str, str]] = None, timeout: float = 120.0) -> list[Any]:
        """``fn(rank, world_size, *args)`` on ``ranks_per_host`` ranks on every host (or ``ranks_per_host[h]``
        on host h; ranks host-major, as torchrun numbers them), with the torchrun environment and host 0
        as master; results by rank.

        ``fn`` is pickled by reference: a module-level function of a module importable from its own
        directory (a test module is). Raises HostCommandFailed with every failing rank's output when a
        rank raises, dies or does not finish within ``timeout`` s (then every rank is killed).
        """
        counts = [ranks_per_host] * len(self.hosts) if isinstance(ranks_per_host, int) else list(ranks_per_host)
        if len(counts) != len(self.hosts) or min(counts) < 0:
            raise ValueError(f"ranks_per_host {ranks_per_host!r}: give a count >= 0 per host ({len(self.hosts)})")
        placed = [(h, local) for h, count in enumerate(counts) for local in range(count)]
        world = len(placed)
        job = Path(tempfile.mkdtemp(prefix="ranks-", dir=self._dir))
        (job / "call.pkl").write_bytes(pickle.dumps((fn, args)))
        paths = [str(Path(sys.modules[fn.__module__].__file__).resolve().parent)]  # fn's module imports from there
        procs = []
        for rank, (h, local) in enumerate(placed):
            host = self.hosts[h]
            rank_env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
                        "LOCAL_WORLD_SIZE": str(counts[h]), "GROUP_RANK": str(h),
                        "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
                        "OMP_NUM_THREADS": "1", **(env or {})}
            with open(job / f"rank{rank}.log", "w") as log:
                procs.append(host.popen([sys.executable, "-c", RANK_MAIN, str(job), *paths],
                                        env=rank_env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        try:
            for proc in procs:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            late = []
        except subprocess.TimeoutExpired:
            late = [r for r, p in enumerate(procs) if p.poll() is None]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        failed = [r for r, p in enumerate(procs) if p.returncode != 0 or not (job / f"rank{r}.pkl").exists()]
        if failed:
            logs = "".join(f"\n--- rank {r} (host {self.hosts[placed[r][0]].name}, exit "
                           f"{procs[r].returncode}) ---\n{(job / f'rank{r}.log').read_text()[-4000:]}"
                           for r in failed)
            what = f"ranks {late} did not finish within {timeout:g} s" if late else f"ranks {failed} failed"
            raise HostCommandFailed(f"{fn.__name__} on hosts with {counts} ranks: "
                                    f"{what}{logs}")
        return [pickle.loads((job / f"rank{r}.pkl").read_bytes()) for r in range(world)]

    # ------------------------------------------------------------------ tear-down
    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill every host's processes, remove namespaces, veths, bridge and files (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts:
            host.kill()
            _ip("link", "del", host.veth, check=False)
            _ip("netns", "del", host.netns, check=False)
        if self.bridge:
            _ip("link", "del", self.bridge, check=False)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        atexit.unregister(self.close)


def _rank_main(job: str) -> None:
    """Body of one run_ranks rank: call the pickled function, write its pickled result."""
    fn, args = pickle.loads((Path(job) / "call.pkl").read_bytes())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    result = fn(rank, world, *args)
    out = Path(job) / f"rank{rank}.pkl"
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(result))
    tmp.rename(out)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo threads of a failed peer could block a normal exit
