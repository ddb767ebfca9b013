"""The router's failover rules on replicas that only record what they are sent (no processes, no network):
a replica that goes down hands the requests it had not started to the others, keeps them in its own
queue while every replica up is full and sends them on as room frees; requests it had started end with
an error naming it; with no replica up, the waiting ones fail too; a request cancelled while waiting
is dropped."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from plait.serve.replica import Replica
from plait.serve.router import NoReplica, Router
from plait.serve.sampling import SamplingParams
from plait.serve.scheduler import Event


@dataclass
class Recorder(Replica):
    sent: list = field(default_factory=list)
    cancelled: list = field(default_factory=list)
    killed: bool = False

    def submit(self, tracked) -> None:
        self.sent.append(tracked.rid)

    def cancel(self, rid: str) -> None:
        self.cancelled.append(rid)

    def kill(self) -> None:
        self.killed = True


def make_router(capacities: list[int]) -> Router:
    router = Router(dict(max_batch=1, max_queue=0), dp=0)
    for index, capacity in enumerate(capacities):
        router.add(Recorder(index, capacity, host=f"h{index}", status="up"))
    return router


def finish(router: Router, tracked) -> None:
    router.deliver(router.replicas[tracked.replica], [Event(tracked.rid, None, "", "stop")])


def test_failover_waits_for_room_and_fails_only_started_requests():
    async def scenario():
        router = make_router([2, 3])
        params = SamplingParams(max_tokens=4)
        reqs = [router.submit([1, 2], params, 10.0) for _ in range(5)]
        assert [len(r.inflight) for r in router.replicas] == [2, 3]
        down, other = router.replicas[1], router.replicas[0]
        started = [t for t in reqs if t.replica == 1][0]
        router.deliver(down, [Event(started.rid, 7, "x")])          # one token: it has started
        router.mark_down(down, "gone")
        assert down.killed and down.status == "down"
        error = started.events.get_nowait()
        while error.token is not None:
            error = started.events.get_nowait()
        assert error.finish_reason == "error" and error.error == "replica 1 (h1) failed: gone"
        assert len(router.pending) == 2                               # replica 0 is full: they wait
        waiting = list(router.pending)
        router.cancel(waiting[1])                                     # its client gave up meanwhile
        assert list(router.pending) == waiting[:1]
        finish(router, [t for t in reqs if t.replica == 0][0])       # room on replica 0
        assert not router.pending and waiting[0].replica == 0 and waiting[0].rid in other.sent
        left = list(other.inflight.values())
        router.mark_down(other, "gone too")                           # nothing is up any more
        assert left and all(t.events.get_nowait().error == "replica 0 (h0) failed: gone too" for t in left)
        with pytest.raises(NoReplica, match="replica 0: down gone too; replica 1: down gone"):
            router.submit([1], params, 10.0)

    asyncio.run(scenario())


def test_pending_requests_fail_when_the_last_replica_goes():
    async def scenario():
        router = make_router([1, 1])
        params = SamplingParams(max_tokens=2)
        first, second = (router.submit([1], params, 5.0) for _ in range(2))
        router.mark_down(router.replicas[0], "a")                     # its request waits: replica 1 is full
        assert list(router.pending) == [first if first.replica == 0 else second]
        router.mark_down(router.replicas[1], "b")
        assert not router.pending
        for tracked in (first, second):
            assert tracked.events.get_nowait().finish_reason == "error"

    asyncio.run(scenario())
