"""The hosts of a job, and which of them are still there, so a failed collective names the host that was lost.

A job over several hosts fails in gloo in ways that name no host: a peer whose processes were
killed gives "Connection closed by peer [10.0.0.2]:40112", a cut link a timeout. At
:func:`plait.init_mesh` every rank learns every rank's host (:func:`gather_hosts`, also the
input of :meth:`plait.ParallelConfig.check_hosts`). When the job spans hosts, each rank also
runs a :class:`HostWatch`: a thread that bumps the rank's counter in the job's rendezvous
store (at ``MASTER_ADDR:MASTER_PORT``) every :data:`HEARTBEAT_S`, and leaves a note
there when the rank stops on its own. When an operation fails, :meth:`HostWatch.lost_hosts` reads
every counter, waits :data:`STALE_S` and reads them again: a host whose ranks all stopped
counting without a note is lost. If the store cannot be reached, the host holding it is the one
lost (or this host's own link). Counters, not clocks: the hosts' clocks need not agree.
"""
from __future__ import annotations

import datetime
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import torch.distributed as dist

from .comm.rendezvous import all_gather_text, host_key
from .comm.torch_backend import TorchCommunicator
from .config import ranks_text
from .errors import HostLost
from .nodes import source_address

HEARTBEAT_S = 0.5
STALE_S = 2.0           # a rank whose counter did not move for this long has stopped
STORE_TIMEOUT_S = 5.0
T = TypeVar("T")


@dataclass(frozen=True)
class HostMap:
    """Every global rank's host: ``labels[r]`` names it (its host name, made unique), ``addresses[r]`` is the
    address the rank reaches the master from ("" if unknown); ``nonce`` is rank 0's id of this job."""

    labels: list[str]
    addresses: list[str]
    nonce: str

    @property
    def hosts(self) -> dict[str, list[int]]:
        """Each host's ranks, hosts in order of their first rank."""
        out: dict[str, list[int]] = {}
        for rank, label in enumerate(self.labels):
            out.setdefault(label, []).append(rank)
        return out

    def describe(self, label: str) -> str:
        """'b (10.0.0.2; ranks 2-3)'."""
        ranks = self.hosts[label]
        address = self.addresses[ranks[0]]
        return f"{label} ({address + '; ' if address else ''}ranks {ranks_text(ranks)})"


def gather_hosts(comm: TorchCommunicator) -> HostMap:
    """Every rank's host over the WORLD group ``comm`` (a collective): one all-gather of short texts."""
    master = os.environ.get("MASTER_ADDR")
    address = (source_address(master) if master else None) or ""
    rows = [row.split("\t") for row in
            all_gather_text(comm, "\t".join((host_key(), socket.gethostname(), address, uuid.uuid4().hex)))]
    first_of_key: dict[str, int] = {}
    for rank, (key, *_) in enumerate(rows):
        first_of_key.setdefault(key, rank)
    names = [rows[rank][1] for rank in first_of_key.values()]
    labels, seen = {}, {}
    for key, name in zip(first_of_key, names):
        seen[name] = seen.get(name, 0) + 1                # same host name, other machines (containers): #2, #3
        labels[key] = name if names.count(name) == 1 else f"{name}#{seen[name]}"
    return HostMap([labels[key] for key, *_ in rows], [row[2] for row in rows], rows[0][3])


def _bounded(call: Callable[[], T], timeout_s: float = STORE_TIMEOUT_S) -> T:
    """``call()`` (store operations) in a daemon thread, RuntimeError if it takes over ``timeout_s``: a store
    client waits for an answer forever once the link to the store is cut, whatever its own timeout."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="plait-hostwatch-store", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise RuntimeError(f"no answer from the store within {timeout_s:g} s")
    ok, value = outcome[0]
    if not ok:
        raise RuntimeError(str(value)) from value
    return value


def _host_at(hosts: HostMap, addr: str) -> Optional[str]:
    """The label of the host holding address ``addr`` (its ranks reach the master from it), if one does."""
    try:
        resolved = socket.gethostbyname(addr)
    except OSError:
        return None
    return next((label for label, ranks in hosts.hosts.items()
                 if hosts.addresses[ranks[0]] in (addr, resolved)), None)


class HostWatch:
    """This rank's heartbeat in the rendezvous store, and the judge of which hosts stopped (module doc)."""

    def __init__(self, hosts: HostMap, rank: int, addr: str, port: int) -> None:
        self.hosts, self.rank, self.addr, self.port = hosts, rank, addr, port
        self.prefix = f"plait/hostwatch/{hosts.nonce}"
        timeout = datetime.timedelta(seconds=STORE_TIMEOUT_S)
        # Two clients: a heartbeat blocked on a cut link must not hold up the judge's reads.
        self._beat_store = dist.TCPStore(addr, port, is_master=False, timeout=timeout, wait_for_workers=False)
        self._judge_store = dist.TCPStore(addr, port, is_master=False, timeout=timeout, wait_for_workers=False)
        self._beat_store.add(self._key(rank), 1)
        self.store_host = _host_at(hosts, addr)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="plait-hostwatch", daemon=True)
        self._thread.start()

    def _key(self, rank: int) -> str:
        return f"{self.prefix}/beat/{rank}"

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat_store.add(self._key(self.rank), 1)
            except RuntimeError:
                return               # the store is gone (a store error is never transient); the judge will say so

    def close(self, note: Optional[str] = None) -> None:
        """Stop the heartbeat; with a ``note`` (why this rank stops early), leave it in the store, so that the
        other ranks' judges see this rank stopped on purpose and was not lost."""
        self._stop.set()
        if note is None:
            return
        try:
            _bounded(lambda: self._judge_store.set(f"{self.prefix}/left/{self.rank}", note[:500]))
        except RuntimeError:
            pass

    def _counters(self) -> list[int]:
        return _bounded(lambda: [self._judge_store.add(self._key(r), 0) for r in range(len(self.hosts.labels))])

    def lost_hosts(self) -> Optional[str]:
        """Which hosts stopped without a word (waits :data:`STALE_S`): 'lost host b (10.0.0.2; ranks 2-3): ...',
        or None if every host is there or its ranks left on purpose."""
        try:
            before = self._counters()
            time.sleep(STALE_S)
            after = self._counters()
            stopped = {r for r, (a, b) in enumerate(zip(before, after)) if a == b and r != self.rank}
            left = {r for r in stopped
                    if _bounded(lambda r=r: self._judge_store.check([f"{self.prefix}/left/{r}"]))}
        except RuntimeError as exc:
            where = f"host {self.hosts.describe(self.store_host)}" if self.store_host else f"the host at {self.addr}"
            return (f"lost {where}, or this host's network: the job's store there ({self.addr}:{self.port}) does not "
                    f"answer ({str(exc).splitlines()[0][:200]})")
        lost = [h for h, ranks in self.hosts.hosts.items()
                if self.rank not in ranks and all(r in stopped and r not in left for r in ranks)]
        if not lost:
            return None
        return f"lost host {'; host '.join(self.hosts.describe(h) for h in lost)}: its ranks stopped answering"


def explain(watch: Optional[HostWatch], exc: BaseException, hint: str = "") -> Optional[HostLost]:
    """A :class:`~plait.errors.HostLost` naming the lost hosts if ``exc`` came from losing one, else None."""
    if watch is None:
        return None
    lost = watch.lost_hosts()
    if lost is None:
        return None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return HostLost(f"rank {watch.rank} ({watch.hosts.labels[watch.rank]}): {lost} ({type(exc).__name__}: {first})"
                    f"{hint}")
