"""The OpenAI-compatible HTTP API over a :class:`~plait.serve.router.Router` (FastAPI).

=============================  ================================================================
route                          what
=============================  ================================================================
``POST /v1/completions``       prompt as text or token ids; ``stream`` for server-sent events
``POST /v1/chat/completions``  messages through the tokenizer's chat template
``GET /v1/models``             the one model served
``GET /health``                each replica's state; 200 while one is up, else 503
``GET /metrics``               Prometheus text format
=============================  ================================================================

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for bad
input (checked before a replica sees the request), 503 with ``Retry-After`` when every queue
is full or no replica is up, 504 when a request passes its deadline. Choices carry the
generated ``token_ids`` besides the text (an extension; OpenAI clients ignore it).

Every request has a deadline: the server's ``--request-timeout``, or sooner the request's own
``timeout`` field (seconds > 0; an extension, OpenAI's API has no such field). The replica
ends a request past its deadline and frees its slot: a plain request answers 504, a stream
that already started ends with the error JSON as its last event. The HTTP side waits
:data:`DEADLINE_GRACE_S` longer, so a replica that stops answering still gets a 504.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from .metrics import Metrics
from .router import NoReplica, Overloaded, Router, Tracked
from .sampling import SamplingParams
from .scheduler import Event, check_prompt

Number = Union[StrictInt, StrictFloat]
DEADLINE_GRACE_S = 1.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = (status, message, kind, param,
                                                                                     code, headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    max_tokens: StrictInt = 16
    temperature: Number = 1.0
    top_p: Number = 1.0
    top_k: StrictInt = 0
    seed: Optional[StrictInt] = None
    stop: Union[None, StrictStr, list[StrictStr]] = None
    stream: StrictBool = False
    ignore_eos: StrictBool = False
    n: StrictInt = 1
    timeout: Optional[Number] = None


class CompletionBody(_Sampling):
    prompt: Union[StrictStr, list[StrictInt]]


class Message(BaseModel):
    role: StrictStr
    content: StrictStr


class ChatBody(_Sampling):
    messages: list[Message]
    max_completion_tokens: Optional[StrictInt] = None


@dataclass
class ServedModel:
    """What the API needs to know about the model: the names clients may ask for (the first is its main
    name), its tokenizer, context and vocabulary."""

    names: tuple[str, ...]
    tokenizer: object
    max_len: int
    vocab_size: int
    request_timeout_s: float

    @property
    def name(self) -> str:
        return self.names[0]

    def check(self, model: str) -> None:
        """404 ``model_not_found`` (OpenAI's shape) unless ``model`` is one of the served names."""
        if model not in self.names:
            raise ApiError(404, f"The model `{model}` does not exist. This server serves "
                                f"{', '.join(f'`{n}`' for n in self.names)}.", param="model", code="model_not_found")

    def card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "plait"}


def create_app(router: Router, served: ServedModel, metrics: Optional[Metrics] = None) -> FastAPI:
    """The FastAPI app; its lifespan attaches the router to the loop and closes it (draining) at shutdown."""
    metrics = metrics or Metrics()
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
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        error = ApiError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None)
        return JSONResponse(error.body(), status_code=400)

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
        prompt = body.prompt if isinstance(body.prompt, list) else _encode(served, body.prompt)
        return await _serve("completions", body, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        served.check(body.model)
        tokenizer = served.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, f"model {served.name!r} has no chat template; use /v1/completions")
        text = tokenizer.apply_chat_template([m.model_dump() for m in body.messages], tokenize=False,
                                             add_generation_prompt=True)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await _serve("chat", body, _encode(served, text, special=False), chat=True)

    async def _serve(endpoint: str, body: _Sampling, prompt: list[int], chat: bool):
        try:
            tracked = _submit(router, served, body, prompt)
        except ApiError as err:
            metrics.requests.labels(endpoint, str(err.status)).inc()
            raise
        reply = _Reply(body.model, tracked, chat, metrics, endpoint)
        if body.stream:
            return StreamingResponse(reply.stream(router), media_type="text/event-stream")
        return await reply.whole(router)

    return app


def _encode(served: ServedModel, text: str, special: bool = True) -> list[int]:
    if served.tokenizer is None:
        raise ApiError(400, f"model {served.name!r} has no tokenizer; give the prompt as a list of token ids",
                       param="prompt")
    return list(served.tokenizer(text, add_special_tokens=special)["input_ids"])


def _submit(router: Router, served: ServedModel, body: _Sampling, prompt: list[int]) -> Tracked:
    """Check everything about the request, then hand it to the router (400 / 503 as ApiError)."""
    if body.n != 1:
        raise ApiError(400, "n must be 1", param="n")
    try:
        params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k,
                                top_p=body.top_p, seed=body.seed, stop=body.stop or (), ignore_eos=body.ignore_eos,
                                timeout=body.timeout)
        check_prompt(prompt, served.max_len, served.vocab_size)
    except ValueError as err:
        raise ApiError(400, str(err)) from None
    timeout_s = served.request_timeout_s if params.timeout is None else min(params.timeout, served.request_timeout_s)
    try:
        return router.submit(prompt, params, timeout_s)
    except Overloaded as err:
        raise ApiError(503, f"the server is at capacity ({err}); retry later", kind="server_overloaded",
                       headers={"Retry-After": "1"}) from None
    except NoReplica as err:
        raise ApiError(503, str(err), kind="service_unavailable", headers={"Retry-After": "5"}) from None


def _failure(event: Event) -> ApiError:
    if event.finish_reason == "deadline":
        return ApiError(504, event.error or "the request passed its deadline", kind="timeout")
    if event.error and event.error.startswith("queue full"):
        return ApiError(503, event.error, kind="server_overloaded", headers={"Retry-After": "1"})
    return ApiError(503, event.error or "the request failed", kind="service_unavailable")


class _Reply:
    """Turns one request's events into an OpenAI response (whole or streamed) and records its metrics."""

    def __init__(self, model: str, tracked: Tracked, chat: bool, metrics: Metrics, endpoint: str) -> None:
        self.model, self.tracked, self.chat, self.metrics, self.endpoint = model, tracked, chat, metrics, endpoint
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.arrived = time.monotonic()
        self.first: Optional[float] = None
        self.tokens: list[int] = []
        self.text = ""

    async def events(self, router: Router) -> AsyncIterator[Event]:
        timeout_s = self.tracked.timeout_s
        deadline = self.arrived + timeout_s + DEADLINE_GRACE_S
        done = False
        try:
            while True:
                try:
                    event = await asyncio.wait_for(self.tracked.events.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise ApiError(504, f"the request passed its deadline of {timeout_s:g} s (its replica did not "
                                        f"answer)", kind="timeout") from None
                if event.token is not None:
                    if self.first is None:
                        self.first = time.monotonic()
                        self.metrics.ttft.observe(self.first - self.arrived)
                    self.tokens.append(event.token)
                self.text += event.text
                if event.finish_reason is not None:
                    done = True
                    if event.finish_reason in ("error", "deadline"):
                        raise _failure(event)
                    if len(self.tokens) > 1:
                        self.metrics.tpot.observe((time.monotonic() - self.first) / (len(self.tokens) - 1))
                yield event
                if done:
                    return
        finally:
            if not done:
                router.cancel(self.tracked)

    def usage(self) -> dict:
        prompt = len(self.tracked.prompt)
        return {"prompt_tokens": prompt, "completion_tokens": len(self.tokens),
                "total_tokens": prompt + len(self.tokens)}

    def _choice(self, text: str, tokens: list[int], finish: Optional[str], delta: bool) -> dict:
        choice = {"index": 0, "finish_reason": finish, "token_ids": tokens}
        if self.chat:
            key = "delta" if delta else "message"
            choice[key] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        return choice

    def _object(self, chunk: bool) -> str:
        if self.chat:
            return "chat.completion.chunk" if chunk else "chat.completion"
        return "text_completion"

    async def whole(self, router: Router) -> JSONResponse:
        finish = None
        try:
            async for event in self.events(router):
                finish = event.finish_reason
        except ApiError as err:
            self.metrics.requests.labels(self.endpoint, str(err.status)).inc()
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        self.metrics.requests.labels(self.endpoint, "200").inc()
        return JSONResponse({"id": self.id, "object": self._object(False), "created": self.created,
                             "model": self.model, "choices": [self._choice(self.text, self.tokens, finish, False)],
                             "usage": self.usage()})

    async def stream(self, router: Router) -> AsyncIterator[str]:
        def chunk(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        base = {"id": self.id, "object": self._object(True), "created": self.created, "model": self.model}
        try:
            async for event in self.events(router):
                tokens = [event.token] if event.token is not None else []
                yield chunk({**base, "choices": [self._choice(event.text, tokens, event.finish_reason, True)]})
            yield chunk({**base, "choices": [], "usage": self.usage()})
            self.metrics.requests.labels(self.endpoint, "200").inc()
        except ApiError as err:
            self.metrics.requests.labels(self.endpoint, str(err.status)).inc()
            yield chunk(err.body())
        yield "data: [DONE]\n\n"
