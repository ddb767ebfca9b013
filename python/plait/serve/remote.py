"""Replicas on other hosts, seen from the router: registration, health polls and request streams, over HTTP.

A replica host (``plait serve --replica-of ROUTER:PORT``, :mod:`plait.serve.agent`) registers with
the router: ``POST /plait/register`` with its URL, an instance id, its model's fingerprint and
the capacity of each of its replicas. The router refuses a model other than its own (409) and,
when ``PLAIT_SERVE_TOKEN`` is set, a caller without that token (401). Then, for each such host:

- every :data:`POLL_S` it asks ``GET {url}/plait/replicas`` (bounded by :data:`POLL_TIMEOUT_S`) for
  each replica's state and stats. A failed poll (the host vanished, its link cut, its server gone)
  marks all its replicas down, with failover as for a local replica; a later good poll brings
  them back up. A new instance id (the host restarted) counts as a failure first;
- each request travels as ``POST {url}/plait/generate``, answered with a stream of JSON lines,
  each a :class:`~plait.serve.scheduler.Event`; closing the stream cancels the request there.
  A line ``{"replica_down": reason}`` says the replica there failed before the request started:
  the router marks it down and sends the request elsewhere.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Annotated, Optional

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

from .replica import Replica
from .router import Router, Tracked
from .scheduler import Event

log = logging.getLogger("plait.serve")

POLL_S = 0.5
POLL_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 5.0
TOKEN_ENV = "PLAIT_SERVE_TOKEN"


def auth_headers() -> dict[str, str]:
    token = os.environ.get(TOKEN_ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


def authorized(header: Optional[str]) -> bool:
    """Whether a request's Authorization header carries ``PLAIT_SERVE_TOKEN`` (always, when it is unset)."""
    token = os.environ.get(TOKEN_ENV)
    return not token or hmac.compare_digest(header or "", f"Bearer {token}")


def request_body(tracked: Tracked, replica: int) -> dict:
    return {"replica": replica, "prompt": tracked.prompt, "params": asdict(tracked.params),
            "timeout_s": tracked.timeout_s}


@dataclass
class RemoteReplica(Replica):
    """Replica ``remote_index`` of the host at ``url``; each request it holds is a stream task."""

    hosts: "RemoteHosts" = None
    url: str = ""
    remote_index: int = 0
    streams: dict = field(default_factory=dict)

    def health(self) -> dict:
        return {**super().health(), "url": self.url, "remote_replica": self.remote_index}

    def submit(self, tracked: Tracked) -> None:
        self.streams[tracked.rid] = asyncio.get_running_loop().create_task(self.hosts.stream(self, tracked))

    def cancel(self, rid: str) -> None:
        task = self.streams.pop(rid, None)
        if task is not None:
            task.cancel()

    def kill(self) -> None:
        for rid in list(self.streams):
            self.cancel(rid)


@dataclass
class RemoteHost:
    url: str
    instance: str
    replicas: list[RemoteReplica]
    poller: Optional[asyncio.Task] = None


class RemoteHosts:
    """The router's other hosts (module doc); lives on the router's event loop."""

    def __init__(self, router: Router, fingerprint: dict) -> None:
        self.router, self.fingerprint = router, fingerprint
        self.hosts: dict[str, RemoteHost] = {}
        self.client = httpx.AsyncClient(headers=auth_headers(), limits=httpx.Limits(max_connections=None),
                                        timeout=httpx.Timeout(POLL_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))

    # ----------------------------------------------------------------- registration
    def check(self, fingerprint: dict) -> Optional[str]:
        """Why a host with this model fingerprint may not join (None: it may)."""
        differ = sorted(k for k in set(self.fingerprint) | set(fingerprint)
                        if self.fingerprint.get(k) != fingerprint.get(k))
        if differ:
            detail = ", ".join(f"{k}: router {self.fingerprint.get(k)!r}, replica {fingerprint.get(k)!r}"
                               for k in differ)
            return f"the replica host serves another model than this router ({detail})"
        return None

    def register(self, url: str, instance: str, capacities: list[int], host: str) -> list[int]:
        """Take the replicas of the host at ``url`` (again: the same instance keeps its entries); their indices."""
        known = self.hosts.get(url)
        if known is not None and known.instance == instance and len(known.replicas) == len(capacities):
            return [r.index for r in known.replicas]
        if known is not None:          # the host restarted (or changed): its old replicas are gone
            for replica in known.replicas:
                self.router.mark_down(replica, f"host {url} restarted (instance {instance})")
            known.poller.cancel()
            replicas = known.replicas
            for replica, capacity in zip(replicas, capacities):
                replica.capacity, replica.status = capacity, "starting"
        else:
            replicas = []
        for i in range(len(replicas), len(capacities)):
            replica = RemoteReplica(len(self.router.replicas), capacities[i], host=host, hosts=self, url=url,
                                    remote_index=i)
            self.router.add(replica)
            replicas.append(replica)
        entry = RemoteHost(url, instance, replicas[:len(capacities)])
        self.hosts[url] = entry
        entry.poller = asyncio.get_running_loop().create_task(self.poll(entry))
        log.warning("plait serve: replica host %s (%s) joined with %d replicas", host, url, len(capacities))
        return [r.index for r in entry.replicas]

    def unregister(self, url: str, instance: str, drain: bool) -> bool:
        """The host at ``url`` stops on purpose. ``drain``: it is about to; its replicas take no new requests
        and finish what they hold (no more polls: its server stops listening now). Else it is gone: its
        replicas are stopped (anything they still hold fails over)."""
        entry = self.hosts.get(url)
        if entry is None or entry.instance != instance:
            return False
        entry.poller.cancel()
        for replica in entry.replicas:
            if drain:
                if replica.status == "up":
                    replica.status, replica.reason = "draining", "its host is stopping; it finishes what it holds"
                continue
            self.router.mark_down(replica, "its host stopped serving")
            replica.status, replica.reason = "stopped", "its host stopped serving (plait serve ended there)"
        if not drain:
            del self.hosts[url]
        return True

    # ----------------------------------------------------------------- health
    async def poll(self, entry: RemoteHost) -> None:
        """Mark the host's replicas up or down from its answers, every POLL_S, until cancelled."""
        while True:
            try:
                answer = await self.client.get(f"{entry.url}/plait/replicas")
                answer.raise_for_status()
                body = answer.json()
                if body["instance"] != entry.instance:
                    raise RuntimeError(f"another instance answers there ({body['instance']}), not {entry.instance}")
                self._apply(entry, body["replicas"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure to answer is the host's
                detail = str(exc).strip() or type(exc).__name__
                for replica in entry.replicas:
                    self.router.mark_down(replica, f"host {replica.host} ({entry.url}) does not answer: {detail}")
            await asyncio.sleep(POLL_S)

    def _apply(self, entry: RemoteHost, states: list[dict]) -> None:
        for replica, state in zip(entry.replicas, states):
            self.router.update_stats(replica, {"running": state["running"], "waiting": state["waiting"],
                                               "kv_used": state["kv_cache_used"]})
            if state["status"] == "up" and replica.status in ("starting", "down"):
                if replica.status == "down":
                    log.warning("plait serve: replica %d (%s) is back", replica.index, replica.host)
                replica.status, replica.reason = "up", ""
                self.router.resend_pending()
            elif state["status"] != "up" and replica.status == "up":
                self.router.mark_down(replica, f"on host {replica.host}: {state['status']} {state['reason']}")

    # ----------------------------------------------------------------- requests
    async def stream(self, replica: RemoteReplica, tracked: Tracked) -> None:
        """Send ``tracked`` to ``replica`` and deliver its events until it ends (cancelled: the stream closes)."""
        url = f"{replica.url}/plait/generate"
        timeout = httpx.Timeout(None if tracked.timeout_s is None else tracked.timeout_s + POLL_TIMEOUT_S,
                                connect=CONNECT_TIMEOUT_S)
        try:
            async with self.client.stream("POST", url, json=request_body(tracked, replica.remote_index),
                                          timeout=timeout) as answer:
                if answer.status_code != 200:
                    body = (await answer.aread()).decode(errors="replace")[:500]
                    raise RuntimeError(f"{url} answered {answer.status_code}: {body}")
                async for line in answer.aiter_lines():
                    if not line:
                        continue
                    message = json.loads(line)
                    if "replica_down" in message:
                        raise RuntimeError(message["replica_down"])
                    self.router.deliver(replica, [Event(**{**message["event"], "rid": tracked.rid})])
            if tracked.rid in replica.inflight:
                raise RuntimeError("the stream ended before the request did")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the stream broke: the replica (or its host) is out of reach
            if tracked.rid in replica.inflight:
                detail = str(exc).strip() or type(exc).__name__
                self.router.mark_down(replica, f"request stream from host {replica.host} broke: {detail}")
        finally:
            if replica.streams.get(tracked.rid) is asyncio.current_task():
                del replica.streams[tracked.rid]

    # ----------------------------------------------------------------- life cycle
    def close(self) -> None:
        """Let go of every host (from any thread): pollers and streams cancelled, the client closed."""
        loop = self.router.loop
        if loop is None or loop.is_closed():
            return

        async def shut() -> None:
            for entry in self.hosts.values():
                entry.poller.cancel()
                for replica in entry.replicas:
                    replica.kill()
            await self.client.aclose()

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.create_task(shut())
        else:
            try:
                asyncio.run_coroutine_threadsafe(shut(), loop).result(timeout=5)
            except Exception:  # noqa: BLE001 - the loop is shutting down; nothing is left to close
                pass


# --------------------------------------------------------------------------- what both sides share
def model_fingerprint(directory: str, dtype: str, max_len: int) -> dict:
    """What a router and a replica host must agree on to serve one model: its config, its weight files, its
    tokenizer, the dtype, the context (hashes, so that hosts with the files at other paths agree) and the plait
    version (the two speak plait's own protocol)."""
    import hashlib
    from pathlib import Path

    root = Path(directory)
    config = json.loads((root / "config.json").read_text())
    for key in ("transformers_version", "_name_or_path"):
        config.pop(key, None)
    weights = sorted((p.name, p.stat().st_size) for p in root.glob("*.safetensors"))
    tokenizer = root / "tokenizer.json"

    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:16]

    import plait

    return {"config": digest(json.dumps(config, sort_keys=True).encode()), "weights": digest(repr(weights).encode()),
            "tokenizer": digest(tokenizer.read_bytes()) if tokenizer.is_file() else None, "dtype": dtype,
            "max_len": max_len, "plait": plait.__version__}


class LeaveBody(BaseModel):
    url: StrictStr
    instance: StrictStr
    drain: StrictBool = False


class JoinBody(LeaveBody):
    host: StrictStr
    fingerprint: dict
    capacities: list[Annotated[StrictInt, Field(ge=1)]]
    check_only: StrictBool = False


def registration_routes(router: Router, fingerprint: dict) -> APIRouter:
    """The router's routes for replica hosts: ``POST /plait/register`` and ``POST /plait/unregister`` (with
    ``drain``: the host is stopping and finishes what it holds; without: it is gone)."""
    routes = APIRouter()

    def refuse(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "replica_refused"}}, status_code=status)

    @routes.post("/plait/register")
    async def register(body: JoinBody, request: Request):
        if not authorized(request.headers.get("authorization")):
            return refuse(401, f"a replica host needs this router's token ({TOKEN_ENV})")
        if router.remote is None:
            router.remote = RemoteHosts(router, fingerprint)
        refused = router.remote.check(body.fingerprint)
        if refused is not None:
            return refuse(409, refused)
        if body.check_only:
            return {"replicas": []}
        return {"replicas": router.remote.register(body.url, body.instance, body.capacities, body.host)}

    @routes.post("/plait/unregister")
    async def unregister(body: LeaveBody, request: Request):
        if not authorized(request.headers.get("authorization")):
            return refuse(401, f"a replica host needs this router's token ({TOKEN_ENV})")
        done = router.remote is not None and router.remote.unregister(body.url, body.instance, body.drain)
        return {"unregistered": done}

    return routes
