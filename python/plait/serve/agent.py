"""``plait serve --replica-of ROUTER:PORT``: this host's replicas serve a router on another host.

The host starts its ``--dp`` replicas (a local :class:`~plait.serve.router.Router` runs them, with
failover among them), serves the routes the router uses (:mod:`plait.serve.remote`) on ``--host``
and ``--port``, and registers with the router at ``ROUTER:PORT``: first before loading the model
(a router serving another model, or wanting a token this host lacks, refuses it at once), then
every :data:`REGISTER_EVERY_S` once the replicas are up, so a restarted router finds it again.
SIGTERM (or Ctrl-C): tell the router (it sends nothing new here), let in-flight requests finish,
unregister, stop every rank, exit 0.

=============================  ================================================================
route                          what
=============================  ================================================================
``GET /plait/replicas``        this host's instance id and each replica's state and stats
``POST /plait/generate``       one request on one replica; a stream of JSON lines (events)
=============================  ================================================================
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Optional

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, StrictInt

from .remote import CONNECT_TIMEOUT_S, TOKEN_ENV, auth_headers, authorized
from .router import NoReplica, Overloaded, Router
from .sampling import SamplingParams
from .scheduler import Event

log = logging.getLogger("plait.serve")

REGISTER_EVERY_S = 5.0


class Refused(RuntimeError):
    """The router will not take this host (another model, a missing token)."""


@dataclass
class Registration:
    """Who this host is to the router, and where the router is."""

    router_url: str          # http://ROUTER:PORT
    address: str             # where the router reaches this host: its address ...
    port: int                # ... and port
    host: str                # this host's name, for the router's health and errors
    fingerprint: dict
    capacities: list[int]
    instance: str = ""

    def __post_init__(self) -> None:
        self.instance = self.instance or uuid.uuid4().hex

    @property
    def url(self) -> str:
        return f"http://{f'[{self.address}]' if ':' in self.address else self.address}:{self.port}"

    def body(self, check_only: bool = False) -> dict:
        return {"url": self.url, "instance": self.instance, "host": self.host, "fingerprint": self.fingerprint,
                "capacities": self.capacities, "check_only": check_only}

    def leave(self, drain: bool) -> None:
        """Tell the router this host is stopping (``drain``: about to; it finishes what it holds) or gone."""
        try:
            httpx.post(f"{self.router_url}/plait/unregister", headers=auth_headers(), timeout=2.0,
                       json={"url": self.url, "instance": self.instance, "drain": drain})
        except httpx.HTTPError:
            pass                 # the router is gone; nothing to tell

    def post(self, client: httpx.Client | None = None, check_only: bool = False) -> None:
        """Register (or only check that the router would take this host); Refused on 401/409, httpx errors
        when the router cannot be reached."""
        answer = (client or httpx).post(f"{self.router_url}/plait/register", json=self.body(check_only),
                                        headers=auth_headers(), timeout=CONNECT_TIMEOUT_S)
        if answer.status_code in (401, 409):
            raise Refused(f"the router at {self.router_url} refused this host: "
                          f"{answer.json()['error']['message']}")
        answer.raise_for_status()


class GenerateBody(BaseModel):
    """One request for one of this host's replicas (what :func:`plait.serve.remote.request_body` sends)."""

    replica: StrictInt
    prompt: list[StrictInt]
    params: dict
    timeout_s: Optional[float] = None


class AgentServer(uvicorn.Server):
    """uvicorn's server, telling the router first when a signal stops it: the router sends nothing new and
    keeps the streams open while this host finishes them (and stops polling a server that stops listening)."""

    def __init__(self, config: uvicorn.Config, registration: Registration) -> None:
        super().__init__(config)
        self.registration = registration

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            self.registration.leave(drain=True)
        super().handle_exit(sig, frame)


def create_agent_app(router: Router, registration: Registration, on_refused) -> FastAPI:
    """The replica host's app; its lifespan registers (again and again) and, at shutdown, unregisters and
    closes the router. ``on_refused(message)`` is called when the router refuses the host."""

    async def keep_registered() -> None:
        async with httpx.AsyncClient(headers=auth_headers()) as client:
            joined, failure = False, ""
            while True:
                try:
                    answer = await client.post(f"{registration.router_url}/plait/register", json=registration.body(),
                                               timeout=CONNECT_TIMEOUT_S)
                    if answer.status_code in (401, 409):
                        on_refused(answer.json()["error"]["message"])
                        return
                    answer.raise_for_status()
                    if not joined:
                        log.warning("plait serve: registered with the router at %s as %s (replicas %s there)",
                                    registration.router_url, registration.url, answer.json()["replicas"])
                    joined = True
                except httpx.HTTPError as exc:
                    if str(exc) != failure:           # say it once, not every retry
                        log.warning("plait serve: registering with the router at %s failed (%s); retrying",
                                    registration.router_url, exc)
                    joined, failure = False, str(exc)
                await asyncio.sleep(REGISTER_EVERY_S if joined else 1.0)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        router.attach(asyncio.get_running_loop())
        task = asyncio.get_running_loop().create_task(keep_registered())
        yield
        task.cancel()
        await asyncio.get_running_loop().run_in_executor(None, registration.leave, False)
        await asyncio.get_running_loop().run_in_executor(None, router.close)

    app = FastAPI(title="plait serve (replica host)", lifespan=lifespan)

    def unauthorized(request: Request) -> Optional[JSONResponse]:
        if authorized(request.headers.get("authorization")):
            return None
        return JSONResponse({"error": {"message": f"needs the router's token ({TOKEN_ENV})"}}, status_code=401)

    @app.get("/plait/replicas")
    async def replicas(request: Request):
        return unauthorized(request) or {"instance": registration.instance, "replicas": router.health()}

    @app.post("/plait/generate")
    async def generate(body: GenerateBody, request: Request):
        refused = unauthorized(request)
        if refused is not None:
            return refused
        try:
            params = SamplingParams(**{**body.params, "stop": tuple(body.params.get("stop", ()))})
        except (TypeError, ValueError) as err:
            return JSONResponse({"error": {"message": f"params: {err}"}}, status_code=400)
        try:
            tracked = router.submit(body.prompt, params, body.timeout_s, replica=body.replica)
        except NoReplica as err:
            return StreamingResponse(iter([json.dumps({"replica_down": str(err)}) + "\n"]),
                                     media_type="application/x-ndjson")
        except Overloaded as err:
            full = Event("", None, "", "error", error=f"queue full on host {registration.host}: {err}")
            return StreamingResponse(iter([json.dumps({"event": asdict(full)}) + "\n"]),
                                     media_type="application/x-ndjson")

        async def lines():
            done = False
            try:
                while not done:
                    event = await tracked.events.get()
                    done = event.finish_reason is not None
                    if (event.finish_reason == "error" and tracked.produced == 0
                            and router.replicas[tracked.replica].status != "up"):
                        yield json.dumps({"replica_down": event.error}) + "\n"   # the router sends it elsewhere
                    else:
                        yield json.dumps({"event": asdict(event)}) + "\n"
            finally:
                if not done:
                    router.cancel(tracked)        # the router closed the stream

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return app
