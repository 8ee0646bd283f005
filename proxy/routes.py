"""HTTP endpoints. The chat handler is the request path, top to bottom:

validate -> resolve route -> enforce template -> upstream call -> stream or JSON -> detect -> record
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from ptst.proxy import jsonfast, sse
from ptst.proxy.answers import Answer, ChatAnswer, ResponsesAnswer
from ptst.proxy.config import Mode, Route
from ptst.proxy.convert import ChunkConverter
from ptst.proxy.drain import SHUTDOWN_MESSAGE
from ptst.proxy.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    Unauthorized,
    UpstreamError,
)
from ptst.proxy.exchange import Exchange, client_ids
from ptst.proxy.record import LogRecord
from ptst.proxy.rewrite import Policy, enforce
from ptst.proxy.rewrite_responses import enforce_responses
from ptst.proxy.schemas import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from ptst.proxy.state import ProxyState
from ptst.proxy.templates import Template
from ptst.proxy.upstream import Call, error_kind, transport_error

router = APIRouter()
M = TypeVar("M", bound=BaseModel)


def authorized(request: Request) -> ProxyState:
    """The app's state, once the request's API key checks out (a plain call, not a FastAPI
    dependency: dependency resolution is measurable on this hot path). Keys are compared as
    bytes in constant time, every key every time; no message or log line ever holds one."""
    state: ProxyState = request.app.state.proxy
    keys = state.snapshot.settings.api_keys
    if keys:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode("latin-1")  # the header's own bytes (any of them)
        ok = False
        for key in keys:
            ok |= hmac.compare_digest(given, key.encode())
        if scheme.lower() != "bearer" or not ok:
            raise Unauthorized(
                "missing or invalid API key (send Authorization: Bearer <key>)",
                code="invalid_api_key",
            )
    return state


def public(request: Request) -> ProxyState:
    """The app's state, for an endpoint that needs no key."""
    state: ProxyState = request.app.state.proxy
    return state


async def chat_completions(request: Request) -> Response:
    state: ProxyState = request.app.state.proxy
    try:  # admission: a request turned away here never reaches an upstream or the log
        authorized(request)
        snapshot = state.snapshot  # templates and routes as of now, whatever reloads meanwhile
        body = await read_json(request, snapshot.settings.server.max_body_bytes)
        req = validate(ChatCompletionRequest, body)
        route, template, mode, policy = snapshot.resolve(req.model)
        path, upstream_body = upstream_request(body, route, template, mode, policy)
    except ProxyError as exc:
        state.metrics.on_rejected("chat/completions", exc.status_code, exc.code or exc.error_type)
        raise
    convert = ChunkConverter() if path == "/completions" else None
    ex = exchange(state, request, route, mode, bool(req.stream), body["messages"])
    answer = ChatAnswer.for_request(ex, upstream_body, req.stream_options, convert)
    return await forward(state, ex, path, upstream_body, answer)


async def responses(request: Request) -> Response:
    """The Responses API, enforced as chat is (rewrite_responses.py); relayed as it arrives."""
    state: ProxyState = request.app.state.proxy
    try:
        authorized(request)
        snapshot = state.snapshot
        body = await read_json(request, snapshot.settings.server.max_body_bytes)
        req = validate(ResponsesRequest, body)
        route, template, mode, policy = snapshot.resolve(req.model)
        upstream_body = responses_request(body, route, template, mode, policy)
    except ProxyError as exc:
        state.metrics.on_rejected("responses", exc.status_code, exc.code or exc.error_type)
        raise
    asked = {k: body[k] for k in ("instructions", "input") if body.get(k) is not None}
    ex = exchange(state, request, route, mode, bool(req.stream), asked)
    return await forward(state, ex, "/responses", upstream_body, ResponsesAnswer(ex))


async def completions(request: Request) -> Response:
    state: ProxyState = request.app.state.proxy
    try:
        authorized(request)
        snapshot = state.snapshot
        body = await read_json(request, snapshot.settings.server.max_body_bytes)
        req = validate(CompletionRequest, body)
        route, *_ = snapshot.resolve(req.model)
        if route.enforced and not route.allow_raw_prompts:
            raise Forbidden(
                f"model {route.model!r} enforces the {route.template!r} template; a raw prompt "
                "would bypass it. Use /v1/chat/completions.",
                param="prompt",
                code="raw_prompt_forbidden",
            )
    except ProxyError as exc:
        state.metrics.on_rejected("completions", exc.status_code, exc.code or exc.error_type)
        raise
    ex = exchange(state, request, route, "raw", bool(req.stream), body["prompt"])
    upstream_body = {**body, "model": route.upstream_name}
    answer = ChatAnswer.for_request(ex, upstream_body, req.stream_options, None)
    return await forward(state, ex, "/completions", upstream_body, answer)


def exchange(
    state: ProxyState, request: Request, route: Route, mode: str, stream: bool, asked: Any
) -> Exchange:
    """The record of this request, under the client's request id and trace when it sent them."""
    rid, parent = client_ids(request.headers)
    keep_text = state.audit.settings.log_text
    return Exchange(route, mode, stream, asked, keep_text, request_id=rid, traceparent=parent)


async def forward(
    state: ProxyState, ex: Exchange, path: str, body: dict[str, Any], answer: Answer
) -> Response:
    """Call the upstream and answer: a stream relayed as it arrives, or one JSON body."""
    if "stream" in body:  # the upstream streams exactly when the proxy relays a stream:
        body["stream"] = ex.stream  # "off" is False to pydantic, true to a plain bool()
    state.metrics.on_request_start(ex.route.model)
    try:
        call = await state.upstreams.open(ex.route, path, body, ex.upstream_headers())
    except BaseException as exc:
        finish(state, ex, exc)
        raise
    if ex.stream:
        return StreamingResponse(
            relay(call, ex, state, answer),
            media_type="text/event-stream",
            headers={"x-request-id": ex.request_id, "cache-control": "no-cache"},
        )
    try:
        raw, data = await call.read_json()
        raw = answer.body(raw, data)
    except BaseException as exc:
        finish(state, ex, exc)
        raise
    finally:
        await call.close()
    record = finish(state, ex)
    headers = {"x-request-id": ex.request_id}
    if record.refusal is not None:
        headers["x-ptst-refusal"] = "true" if record.refusal else "false"
    return Response(raw, media_type="application/json", headers=headers)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    state = authorized(request)
    created = int(time.time())
    return {
        "object": "list",
        "data": [model_card(r, created) for r in state.snapshot.settings.routes],
    }


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str) -> dict[str, Any]:
    """One route, as `client.models.retrieve(name)` asks for it; 404 for any other name."""
    state = authorized(request)
    route = state.snapshot.settings.route(model_id)
    if route is None:
        raise NotFound(
            f"model {model_id!r} is not served by this proxy", param="model", code="model_not_found"
        )
    return model_card(route, int(time.time()))


def model_card(route: Route, created: int) -> dict[str, Any]:
    return {
        "id": route.model,
        "object": "model",
        "created": created,
        "owned_by": "ptst-proxy",
        "template": route.template,
    }


@router.get("/health/live")
async def health_live() -> JSONResponse:
    """The process serves requests (for a liveness probe: restart only when this fails)."""
    return JSONResponse({"status": "ok"})


@router.get("/health")
@router.get("/health/ready")
async def health_ready(request: Request) -> JSONResponse:
    """200 when every route has at least one upstream answering its /health, else 503 naming
    the routes that have none; one dead replica of a route with others alive is still ready.
    With API keys set, only a caller with a key sees routes and upstream URLs."""
    state = public(request)
    routes = state.snapshot.settings.routes
    bases = sorted({u for r in routes for u in r.upstream})
    results = await asyncio.gather(*(state.upstreams.get_health(b) for b in bases))
    up = dict(zip(bases, results, strict=True))
    not_ready = [r.model for r in routes if not any(up[u] for u in r.upstream)]
    body: dict[str, Any] = {"status": "degraded" if not_ready else "ok"}
    try:
        authorized(request)
    except Unauthorized:
        pass  # no key: the verdict alone
    else:
        body["routes_not_ready"] = not_ready
        body["upstreams"] = {b: "ok" if ok else "unreachable" for b, ok in up.items()}
    return JSONResponse(body, status_code=503 if not_ready else 200)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus exposition; behind the API keys unless `server.metrics_public`."""
    state = public(request)
    if not state.snapshot.settings.server.metrics_public:
        authorized(request)
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


# The two generation endpoints are plain Starlette routes: FastAPI's per-request machinery
# (dependency solving, response models) is measurable here and they use none of it.
router.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
router.add_route("/v1/completions", completions, methods=["POST"])
router.add_route("/v1/responses", responses, methods=["POST"])


def upstream_request(
    body: dict[str, Any], route: Route, template: Template | None, mode: Mode, policy: Policy
) -> tuple[str, dict[str, Any]]:
    """The upstream path and body for a chat request: the template enforced per the route."""
    if template is None:
        path, out = "/chat/completions", dict(body)
    else:
        path, out = enforce(body, template, policy, mode)
    out["model"] = route.upstream_name
    return path, out


def responses_request(
    body: dict[str, Any], route: Route, template: Template | None, mode: Mode, policy: Policy
) -> dict[str, Any]:
    """The upstream body for a Responses request; prompt-mode routes cannot serve one."""
    if template is None:
        out = dict(body)
    elif mode == "prompt":
        raise BadRequest(
            f"model {route.model!r} enforces the {template.name!r} template in prompt mode: the "
            "proxy renders the whole prompt itself and sends it to the upstream's /v1/completions, "
            "and the Responses API has no raw-prompt form. Use /v1/chat/completions.",
            param="model",
            code="responses_unsupported_in_prompt_mode",
        )
    else:
        out = enforce_responses(body, template, policy)
    out["model"] = route.upstream_name
    return out


async def relay(
    call: Call, ex: Exchange, state: ProxyState, answer: Answer
) -> AsyncIterator[bytes]:
    """Forward the upstream's events as they arrive; the detector reads along (`answer`).

    The status (200) went out before the first byte: a failure from here on becomes an error
    event (for chat followed by [DONE]). A client disconnect cancels this generator, which
    closes the upstream response and so aborts the generation upstream.
    """
    err = None
    try:
        async for raw, payload in sse.events(call.chunks()):
            out = answer.event(raw, payload)
            if out is not None:
                yield out
        if not answer.done:
            raise UpstreamError(f"upstream {call.base} ended the stream before its end event")
    except (asyncio.CancelledError, GeneratorExit):  # the client went away mid-stream,
        ex.fail(*cancelled(state))  # or the shutdown deadline passed
        state.metrics.on_upstream_error(ex.route.model, "cancelled")
        raise
    except Exception as exc:
        err = transport_error(exc, call.base)
        yield answer.failure(err)
    finally:
        await call.close()
        finish(state, ex, err)


def finish(state: ProxyState, ex: Exchange, exc: BaseException | None = None) -> LogRecord:
    """Record the exchange: metrics now, the log record through the background writer."""
    if isinstance(exc, asyncio.CancelledError):
        ex.fail(*cancelled(state))
    elif isinstance(exc, ProxyError):
        ex.fail(exc.status_code, exc.message)
        if exc.status_code >= 500 or exc.code == "upstream_rejected":
            state.metrics.on_upstream_error(ex.route.model, error_kind(exc))
    elif exc is not None and ex.status == 200:
        ex.fail(500, f"{type(exc).__name__}: {exc}")
    record = ex.record()
    rescorer = state.rescorer
    if rescorer is not None and rescorer.wants(record, head := ex.detector.head()):
        # The answer is on its way with the rules' verdict; the refusal count and the log
        # record wait for the second stage, which runs on its own thread.
        state.metrics.on_request_complete(record, verdict_final=False)

        def judged(final: LogRecord) -> None:
            state.metrics.on_second_stage(record, final)
            state.audit.submit(final)

        if not rescorer.submit(record, head, judged):
            state.metrics.on_second_stage(record, None)
            state.audit.submit(record)
        return record
    state.metrics.on_request_complete(record)
    state.audit.submit(record)
    return record


def cancelled(state: ProxyState) -> tuple[int, str]:
    """The logged status of a request cut off: by the shutdown deadline (proxy/drain.py), or by
    its client going away."""
    if state.drain is not None and state.drain.expired:
        return 503, SHUTDOWN_MESSAGE
    return 499, "client disconnected"


TOO_DEEP = "request body is nested too deeply"


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"request body of {length} bytes is over the limit of {limit} bytes")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    try:
        data = jsonfast.loads(buf)
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise BadRequest(TOO_DEEP, code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    return data


def validate(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except RecursionError:
        raise BadRequest(TOO_DEEP, code="invalid_json") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise BadRequest(
            f"{param}: {first['msg']}" if param else first["msg"], param=param
        ) from None
