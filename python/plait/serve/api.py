"""The OpenAI-compatible HTTP API over a :class:`~plait.serve.router.Router` (FastAPI).

=============================  ================================================================
route                          what
=============================  ================================================================
``POST /v1/completions``       prompt(s) as text or token ids; ``stream`` for server-sent events
``POST /v1/chat/completions``  messages through the tokenizer's chat template
``GET /v1/models``             the served names (``/v1/models/{name}`` one of them)
``GET /health``                each replica's state; 200 while one is up, else 503
``GET /metrics``               Prometheus text format
=============================  ================================================================

The request fields honoured, and those refused, are listed in :mod:`plait.serve.openai_types`;
the response shapes are in :mod:`plait.serve.responses`. Each choice of a request (``n``, or a
list of prompts) is its own request to the router.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for bad or
unsupported input (checked before a replica sees the request), 404 ``model_not_found`` for a
model not served, 503 with ``Retry-After`` when every queue is full or no replica is up, 504
when a request passes its deadline.

Every request has a deadline: the server's ``--request-timeout``, or sooner the request's own
``timeout`` field (seconds > 0; an extension, OpenAI's API has no such field). The replica
ends a request past its deadline and frees its cache; a plain request answers 504, a stream
that already started ends with the error JSON as its last event. The HTTP side waits
:data:`DEADLINE_GRACE_S` longer, so a replica that stops answering still gets a 504.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .metrics import Metrics
from .openai_types import ChatBody, CompletionBody, Refused, _Body
from .responses import Choice, Shapes, usage
from .router import NoReplica, Overloaded, Router, Tracked
from .scheduler import Event, check_prompt

DEADLINE_GRACE_S = 1.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = (status, message, kind, param,
                                                                                     code, headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ServedModel:
    """What the API needs to know about the model: the names clients may ask for (the first is its main
    name), its tokenizer, context and vocabulary."""

    names: tuple[str, ...]
    tokenizer: object
    max_len: int
    vocab_size: int
    request_timeout_s: float
    info: dict = field(default_factory=dict)     # how it is served: dtype (and why), device, layout

    @property
    def name(self) -> str:
        return self.names[0]

    def check(self, model: str) -> None:
        """404 ``model_not_found`` (OpenAI's shape) unless ``model`` is one of the served names."""
        if model not in self.names:
            raise ApiError(404, f"The model `{model}` does not exist. This server serves "
                                f"{', '.join(f'`{n}`' for n in self.names)}.", param="model", code="model_not_found")

    def card(self, name: str) -> dict:
        """OpenAI's model object; ``plait`` (an extension) says how it is served."""
        return {"id": name, "object": "model", "created": 0, "owned_by": "plait", "max_model_len": self.max_len,
                "plait": self.info}


def create_app(router: Router, served: ServedModel, metrics: Optional[Metrics] = None) -> FastAPI:
    """The FastAPI app; its lifespan attaches the router to the loop and closes it (draining) at shutdown."""
    metrics = metrics or Metrics()
    metrics.describe(served.info)
    router.on_stats = metrics.replica_stats

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        router.attach(asyncio.get_running_loop())
        yield
        await asyncio.get_running_loop().run_in_executor(None, router.close)

    app = FastAPI(title="plait serve", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        return JSONResponse(_invalid(err).body(), status_code=400)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [served.card(name) for name in served.names]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        served.check(model)
        return served.card(model)

    @app.get("/health")
    async def health():
        replicas = router.health()
        up = sum(r["status"] == "up" for r in replicas)
        for r in replicas:
            metrics.replica_up.labels(str(r["replica"])).set(1 if r["status"] == "up" else 0)
        status = "ok" if up == len(replicas) else ("degraded" if up else "down")
        return JSONResponse({"status": status, "replicas": replicas}, status_code=200 if up else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        served.check(body.model)
        _check(body)
        prompts = [p if isinstance(p, list) else _encode(served, p) for p in body.prompts()]
        prefixes = [_decode(served, p) if body.echo else "" for p in prompts]
        return await _serve("completions", body, prompts, prefixes, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        served.check(body.model)
        _check(body)
        tokenizer = served.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, f"model {served.name!r} has no chat template; use /v1/completions")
        text = tokenizer.apply_chat_template([m.for_template() for m in body.messages], tokenize=False,
                                             add_generation_prompt=True)
        return await _serve("chat", body, [_encode(served, text, special=False)], [""], chat=True)

    async def _serve(endpoint: str, body: _Body, prompts: list[list[int]], prefixes: list[str], chat: bool):
        try:
            choices, tracked = _submit(router, served, body, prompts, prefixes)
        except ApiError as err:
            metrics.requests.labels(endpoint, str(err.status)).inc()
            raise
        reply = _Reply(body.model, choices, tracked, Shapes(served.tokenizer, chat), metrics, endpoint,
                       body.include_usage)
        if body.stream:
            return StreamingResponse(reply.stream(router), media_type="text/event-stream")
        return await reply.whole(router)

    return app


def _invalid(err: RequestValidationError) -> ApiError:
    """The 400 of a body that does not parse: an unknown field is refused by name (wherever it is nested); a
    value that fits none of a field's accepted forms names the field (not pydantic's union member) and what
    each form wanted."""
    errors = err.errors()
    unknown = next((e for e in errors if e.get("type") == "extra_forbidden"), None)
    if unknown is not None:
        where = _field_path(unknown.get("loc", ()), keep_last=True)   # the unknown name itself
        return ApiError(400, f"plait serve does not support the field '{where}'; leave it out", param=where)
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":   # its location is a character offset, not a field
        offset = first.get("loc", ("body", 0))[-1]
        return ApiError(400, f"the request body is not valid JSON: {first.get('msg', 'invalid JSON')} (at character "
                             f"{offset})")
    where = _field_path(first.get("loc", ()))
    same = list(dict.fromkeys(e.get("msg", "") for e in errors if _field_path(e.get("loc", ())) == where))
    reason = same[0] if len(same) == 1 else f"no accepted form matches ({'; '.join(same[:4])})"
    return ApiError(400, f"{where or 'body'}: {reason or 'invalid request'}", param=where or None)


_UNION_TAGS = {"str", "int", "float", "bool"}


def _field_path(loc, keep_last: bool = False) -> str:
    """``messages.0.content`` from pydantic's location, without ``body`` and union member tags (``str``,
    ``list[int]``, ``function-after[...]``, a request model's class name); ``keep_last``: the last part is a
    field name whatever it looks like."""
    from . import openai_types

    def member_tag(part) -> bool:
        return isinstance(part, str) and (part in _UNION_TAGS or "[" in part or
                                          isinstance(getattr(openai_types, part, None), type))
    parts = [p for p in loc if p != "body"]
    return ".".join(str(p) for i, p in enumerate(parts) if (keep_last and i == len(parts) - 1) or not member_tag(p))


def _check(body: _Body) -> None:
    try:
        body.check()
    except Refused as err:
        raise ApiError(400, str(err), param=err.param) from None


def _encode(served: ServedModel, text: str, special: bool = True) -> list[int]:
    if served.tokenizer is None:
        raise ApiError(400, f"model {served.name!r} has no tokenizer; give the prompt as a list of token ids",
                       param="prompt")
    return list(served.tokenizer(text, add_special_tokens=special)["input_ids"])


def _decode(served: ServedModel, ids: list[int]) -> str:
    return served.tokenizer.decode(ids, skip_special_tokens=True) if served.tokenizer is not None else ""


def _submit(router: Router, served: ServedModel, body: _Body, prompts: list[list[int]], prefixes: list[str]
            ) -> tuple[list[Choice], list[Tracked]]:
    """Check everything about the request, then hand each choice to the router (400 / 503 as ApiError); the
    choices of all prompts share one event queue."""
    plans = []
    try:
        for p, prompt in enumerate(prompts):
            try:
                check_prompt(prompt, served.max_len, served.vocab_size)
            except ValueError as err:
                raise Refused(str(err), body.prompt_field) from None
            plans += [(p, prompt, params) for params in body.params(len(prompt), served.max_len, served.vocab_size)]
    except Refused as err:
        raise ApiError(400, str(err), param=err.param) from None
    events: asyncio.Queue = asyncio.Queue()
    choices, tracked = [], []
    try:
        for index, (p, prompt, params) in enumerate(plans):
            timeout_s = served.request_timeout_s if params.timeout is None else min(params.timeout,
                                                                                    served.request_timeout_s)
            tracked.append(router.submit(prompt, params, timeout_s, events=events))
            choices.append(Choice(index, p, len(prompt), prefixes[p], logprobs=params.logprobs is not None))
    except (Overloaded, NoReplica) as err:
        for t in tracked:
            router.cancel(t)
        if isinstance(err, Overloaded):
            raise ApiError(503, f"the server is at capacity ({err}); retry later", kind="server_overloaded",
                           headers={"Retry-After": "1"}) from None
        raise ApiError(503, str(err), kind="service_unavailable", headers={"Retry-After": "5"}) from None
    return choices, tracked


def _failure(event: Event) -> ApiError:
    if event.finish_reason == "deadline":
        return ApiError(504, event.error or "the request passed its deadline", kind="timeout")
    if event.error and event.error.startswith("queue full"):
        return ApiError(503, event.error, kind="server_overloaded", headers={"Retry-After": "1"})
    return ApiError(503, event.error or "the request failed", kind="service_unavailable")


class _Reply:
    """Turns the events of one request's choices into an OpenAI response (whole or streamed) and records
    its metrics."""

    def __init__(self, model: str, choices: list[Choice], tracked: list[Tracked], shapes: Shapes,
                 metrics: Metrics, endpoint: str, include_usage: bool) -> None:
        self.model, self.choices, self.tracked, self.shapes = model, choices, tracked, shapes
        self.metrics, self.endpoint, self.include_usage = metrics, endpoint, include_usage
        self.by_rid = {t.rid: c for t, c in zip(tracked, choices)}
        self.id = ("chatcmpl-" if shapes.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.arrived = time.monotonic()
        self.first: Optional[float] = None

    async def events(self, router: Router) -> AsyncIterator[tuple[Choice, Event]]:
        """Each choice's events as they come, until every choice has ended (ApiError for a failed one)."""
        timeout_s = max(t.timeout_s for t in self.tracked)
        deadline = self.arrived + timeout_s + DEADLINE_GRACE_S
        queue = self.tracked[0].events
        open_ = set(self.by_rid)
        try:
            while open_:
                try:
                    event = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise ApiError(504, f"the request passed its deadline of {timeout_s:g} s (its replica did not "
                                        f"answer)", kind="timeout") from None
                choice = self.by_rid[event.rid]
                if event.finish_reason in ("error", "deadline"):
                    open_.discard(event.rid)
                    raise _failure(event)
                if event.token is not None and self.first is None:
                    self.first = time.monotonic()
                    self.metrics.ttft.observe(self.first - self.arrived)
                choice.add(event)
                if event.finish_reason is not None:
                    open_.discard(event.rid)
                    if len(choice.tokens) > 1:
                        self.metrics.tpot.observe((time.monotonic() - self.first) / (len(choice.tokens) - 1))
                yield choice, event
        finally:
            for t in self.tracked:
                if t.rid in open_:
                    router.cancel(t)

    def _object(self, chunk: bool) -> str:
        if self.shapes.chat:
            return "chat.completion.chunk" if chunk else "chat.completion"
        return "text_completion"

    async def whole(self, router: Router) -> JSONResponse:
        try:
            async for _ in self.events(router):
                pass
        except ApiError as err:
            self.metrics.requests.labels(self.endpoint, str(err.status)).inc()
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        self.metrics.requests.labels(self.endpoint, "200").inc()
        return JSONResponse({"id": self.id, "object": self._object(False), "created": self.created,
                             "model": self.model, "choices": [self.shapes.whole_choice(c) for c in self.choices],
                             "usage": usage(self.choices)})

    async def stream(self, router: Router) -> AsyncIterator[str]:
        def chunk(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        base = {"id": self.id, "object": self._object(True), "created": self.created, "model": self.model}
        if self.include_usage:
            base["usage"] = None
        try:
            async for choice, event in self.events(router):
                yield chunk({**base, "choices": [self.shapes.chunk_choice(choice, event)]})
            if self.include_usage:
                yield chunk({**base, "choices": [], "usage": usage(self.choices)})
            self.metrics.requests.labels(self.endpoint, "200").inc()
        except ApiError as err:
            self.metrics.requests.labels(self.endpoint, str(err.status)).inc()
            yield chunk(err.body())
        yield "data: [DONE]\n\n"
