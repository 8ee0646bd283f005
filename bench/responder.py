"""A minimal, fast OpenAI-compatible upstream for measuring the proxy's own cost and for faults.

    python -m ptst.bench.responder --host 127.0.0.1 --port 0 [--tokens 16] [--token-interval-ms 50]

prints `READY http://127.0.0.1:<port>/v1` once listening. The request's `model` picks the
behaviour, so one responder serves every test case:

    <any other name>   N tokens of "tok tok ..." (N = --tokens, or max_tokens if smaller)
    refuse             "I'm sorry, but I can't help with that request." in several chunks
    echo               the answer is the JSON of the received `messages` (chat) or `prompt`;
                       for /v1/responses, of the messages vLLM would build: `instructions` as
                       a system message, first, then the `input` items
    parrot             the last user message (or prompt), word for word: an answer whose text
                       the test chooses (the refusal detector's tests)
    last-number        "Adding it up.\n#### N", N the last number in the last user message (or
                       prompt) as written, "#### none" without one: right exactly when a task's
                       answer is its question's last number (the safety bench's accuracy tests)
    error-400/429/500/502/503
                       that status with an OpenAI error envelope; 429 and 503 carry a
                       Retry-After header (RETRY_AFTER)
    hang               never answers; returns when the client disconnects (counted)
    hang-body          the 200 and its headers, then nothing until the client disconnects
    hang-mid-stream    two chunks (or half the JSON body), then nothing until the client
                       disconnects
    drop-mid-stream    two chunks (or half the JSON body), then the connection is cut
    garbage            200 with a non-JSON body, or a stream that is not SSE
    bad-json           200 with a JSON body cut short (well framed), or a stream with one event
                       whose data is JSON cut short (the third; for /v1/responses, before the
                       second text delta), the rest of the stream intact
    gzip               the normal answer, gzip-encoded (content-encoding: gzip) whatever the
                       request's accept-encoding; a stream is compressed chunk by chunk, each
                       flushed as it is sent
    slow               --token-interval-ms between stream chunks (and per token when not streaming)

`--fault NAME` answers every generation request as model NAME would be answered, whatever the
request asks for: a failing replica beside healthy ones (its requests are counted under NAME).
Interim 1xx answers cannot be sent through ASGI: tests/fault_server.py sends those bytes.

`POST /v1/responses` answers in the Responses API's shapes (a response object, or vLLM's named
stream events from response.created to response.completed). Also `GET /v1/models`, `GET /health`, `GET /debug/requests` (the last 100 request bodies) and
`GET /debug/stats` (counters). It is a bare ASGI callable on uvicorn with uvloop and httptools,
access log off: no framework, no per-request allocation beyond the answer itself.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import itertools
import json
import logging
import re
import socket
import time
import zlib
from collections import Counter, deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from ptst.proxy.errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

REFUSAL = "I'm sorry, but I can't help with that request."
FAULT_MODELS = (
    "refuse",
    "echo",
    "parrot",
    "error-400",
    "error-429",
    "error-500",
    "error-502",
    "error-503",
    "hang",
    "hang-body",
    "hang-mid-stream",
    "drop-mid-stream",
    "garbage",
    "bad-json",
    "gzip",
    "slow",
)
_ERRORS = {
    "error-400": (400, "invalid_request_error", "injected bad request"),
    "error-429": (429, "rate_limit_error", "injected rate limit"),
    "error-500": (500, "internal_error", "injected server error"),
    "error-502": (502, "internal_error", "injected bad gateway"),
    "error-503": (503, "internal_error", "injected overload"),
}
RETRY_AFTER = {429: "7", 503: "11"}  # seconds, as the Retry-After header of those errors
# Models whose answer stops after its first events (or half its JSON body): cut, or held open.
_CUT = frozenset({"drop-mid-stream", "hang-mid-stream"})
_CUT_AT = 2  # the stream event before which they stop
_BAD_JSON = b'{"id":"chatcmpl-bad","object":"chat.completion","choices":[{"index":0,"message":'
_BAD_EVENT = b'data: {"id":"chatcmpl-bad","choices":[{"index":0,"delta":{"content":"cut\n\n'
_BAD_RESPONSES_EVENT = (
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"cut'
    b"\n\n"
)
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_GZIP = (b"content-encoding", b"gzip")
_DROP_LOG = "ASGI callable returned without completing response."


@dataclass
class Stats:
    """Counters served at /debug/stats."""

    requests: int = 0
    completed: int = 0
    disconnected: int = 0
    errors_injected: int = 0
    dropped: int = 0
    bad_requests: int = 0
    by_model: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "completed": self.completed,
            "disconnected": self.disconnected,
            "errors_injected": self.errors_injected,
            "dropped": self.dropped,
            "bad_requests": self.bad_requests,
            "by_model": dict(self.by_model),
        }


@dataclass(frozen=True)
class Answer:
    """What to send: text pieces (one per token/chunk) and the finish reason."""

    pieces: list[str]
    finish_reason: str
    prompt_tokens: int


def token_pieces(n: int) -> list[str]:
    """`n` tokens of the fixed text: "tok " repeated, the last one without the space."""
    return ["tok "] * (n - 1) + ["tok"] if n > 0 else []


def split_pieces(text: str) -> list[str]:
    """Split text into word-sized chunks that concatenate back to exactly `text`."""
    pieces: list[str] = []
    for word in text.split(" "):
        pieces.append(word + " ")
    pieces[-1] = pieces[-1][:-1]
    return [p for p in pieces if p]


def requested_tokens(body: dict[str, Any]) -> int | None:
    """max_completion_tokens or max_tokens, whichever the request sets (None if neither)."""
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def approx_prompt_tokens(body: dict[str, Any], chat: bool) -> int:
    """Whitespace-separated words of the prompt: a cheap stand-in for a tokenizer."""
    if chat:
        words = 0
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                words += len(content.split())
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        words += len(part["text"].split())
        return words
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return len(prompt.split())
    if isinstance(prompt, list):
        return sum(len(p.split()) if isinstance(p, str) else 1 for p in prompt)
    return 0


_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")


def last_user_text(body: dict[str, Any], chat: bool) -> str | None:
    """The last user message's content (chat), or the prompt."""
    text = body.get("prompt") if not chat else None
    if chat:
        users = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        users = [m for m in users if m.get("role") == "user"]
        text = users[-1].get("content") if users else None
    return text if isinstance(text, str) else None


def last_number_answer(body: dict[str, Any], chat: bool) -> str:
    """`#### N` with N the last number of the last user message (or prompt): a deterministic,
    arithmetic-free answer, so task-scoring tests know exactly which questions it gets right."""
    text = last_user_text(body, chat)
    numbers = _NUMBER.findall(text) if text is not None else []
    return f"Adding it up.\n#### {numbers[-1] if numbers else 'none'}"


def responses_as_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses request as the chat request vLLM builds from it: `instructions` as the system
    message, first, then the input (a string is one user message)."""
    value = body.get("input")
    items = [{"role": "user", "content": value}] if isinstance(value, str) else list(value or [])
    instructions = body.get("instructions")
    system = [{"role": "system", "content": instructions}] if instructions else []
    return {**body, "messages": [*system, *items]}


def response_object(
    rid: str, model: str, created: int, text: str, status: str, usage: dict[str, int] | None
) -> dict[str, Any]:
    """A Responses API response with one assistant message (the fields the SDK reads)."""
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    message = {"id": f"msg_{rid}", "type": "message", "role": "assistant", "status": status}
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "model": model,
        "status": status,
        "output": [message | {"content": content}] if status == "completed" else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }


def response_events(rid: str, model: str, created: int, answer: Answer) -> list[dict[str, Any]]:
    """The stream vLLM sends for one text answer, in order; sequence numbers from 0."""
    text, item_id = "".join(answer.pieces), f"msg_{rid}"
    started = response_object(rid, model, created, "", "in_progress", None)
    done = response_object(
        rid, model, created, text, "completed", _responses_usage(answer.prompt_tokens, answer)
    )
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    item: dict[str, Any] = {"id": item_id, "type": "message", "role": "assistant"}
    item |= {"status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {"type": "response.content_part.added", **where, "part": part},
        *(
            {"type": "response.output_text.delta", **where, "delta": piece, "logprobs": []}
            for piece in answer.pieces
        ),
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": part | {"text": text}},
        {"type": "response.output_item.done", "output_index": 0, "item": done["output"][0]},
        {"type": "response.completed", "response": done},
    ]
    return [event | {"sequence_number": i} for i, event in enumerate(events)]


def _responses_usage(prompt_tokens: int, answer: Answer) -> dict[str, Any]:
    n = len(answer.pieces)
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": n,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + n,
    }


def plan_answer(model: str, body: dict[str, Any], chat: bool, default_tokens: int) -> Answer:
    """The text of the answer for a normal, `refuse`, `echo`, `parrot` or `last-number` model: a pure
    function."""
    prompt_tokens = approx_prompt_tokens(body, chat)
    if model == "refuse":
        return Answer(split_pieces(REFUSAL), "stop", prompt_tokens)
    if model == "echo":
        echoed = body.get("messages") if chat else body.get("prompt")
        return Answer(split_pieces(json.dumps(echoed)), "stop", prompt_tokens)
    if model == "parrot":
        return Answer(split_pieces(last_user_text(body, chat) or ""), "stop", prompt_tokens)
    if model == "last-number":
        return Answer(split_pieces(last_number_answer(body, chat)), "stop", prompt_tokens)
    limit = requested_tokens(body)
    n = default_tokens if limit is None else max(0, min(limit, default_tokens))
    finish = "length" if limit is not None and limit <= default_tokens else "stop"
    return Answer(token_pieces(n), finish, prompt_tokens)


class Responder:
    """The ASGI application. One instance per process; state is only counters and the log."""

    def __init__(
        self, tokens: int = 16, token_interval_ms: float = 50.0, fault: str | None = None
    ) -> None:
        self.tokens = tokens
        self.interval = token_interval_ms / 1000.0
        self.fault = fault  # every request is answered as this model (a failing replica)
        self.stats = Stats()
        self.recent: deque[Any] = deque(maxlen=100)
        self._ids = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            await self._generate(receive, send, chat=path == "/v1/chat/completions")
        elif method == "POST" and path == "/v1/responses":
            await self._generate(receive, send, chat=True, responses=True)
        elif method == "GET" and path == "/health":
            await _send_bytes(send, 200, b"", [])
        elif method == "GET" and path == "/v1/models":
            await _send_json(send, 200, self._models())
        elif method == "GET" and path == "/debug/requests":
            await _send_json(send, 200, list(self.recent))
        elif method == "GET" and path == "/debug/stats":
            await _send_json(send, 200, self.stats.as_dict())
        else:
            await _send_json(send, 404, error_body(f"no route {method} {path}", "not_found_error"))

    def _models(self) -> dict[str, Any]:
        created = int(time.time())
        names = ("bench", *FAULT_MODELS)
        data = [
            {"id": n, "object": "model", "created": created, "owned_by": "bench", "root": n}
            for n in names
        ]
        return {"object": "list", "data": data}

    async def _generate(
        self, receive: Receive, send: Send, chat: bool, responses: bool = False
    ) -> None:
        stats = self.stats
        stats.requests += 1
        raw = await _read_body(receive)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            self.recent.append(raw.decode("utf-8", "replace"))
            stats.bad_requests += 1
            msg = "body must be a JSON object with a string 'model'"
            await _send_json(send, 400, error_body(msg, "invalid_request_error"))
            return
        self.recent.append(body)
        model: str = self.fault or body["model"]
        stats.by_model[model] += 1
        stream = bool(body.get("stream"))

        if model in _ERRORS:
            status, kind, message = _ERRORS[model]
            stats.errors_injected += 1
            headers = _JSON
            if status in RETRY_AFTER:
                headers = [*_JSON, (b"retry-after", RETRY_AFTER[status].encode())]
            payload = json.dumps(error_body(message, kind, code=str(status))).encode()
            await _send_bytes(send, status, payload, headers)
            return
        if model == "hang" or model == "hang-body":
            if model == "hang-body":  # the head of an answer that never comes
                await _start(send, 200, _SSE if stream else [*_JSON, (b"content-length", b"900")])
            await _until_disconnect(receive)
            stats.disconnected += 1
            return
        if model == "bad-json" and not stream:
            stats.completed += 1
            await _send_bytes(send, 200, _BAD_JSON, _JSON)
            return
        if model == "garbage":
            stats.completed += 1
            if stream:
                await _send_bytes(send, 200, b"this is not SSE\n{{{ nor JSON\n\n", _SSE)
            else:
                await _send_bytes(send, 200, b"<html>definitely not JSON</html>", _JSON)
            return

        answer = plan_answer(
            model, responses_as_chat(body) if responses else body, chat, self.tokens
        )
        rid = f"{'chatcmpl' if chat else 'cmpl'}-bench{next(self._ids)}"
        created = int(time.time())
        if responses:
            await self._answer_responses(
                send, receive, model, answer, "resp_" + rid.rsplit("-", 1)[-1], stream
            )
            return
        if not stream:
            await self._answer_json(send, receive, model, answer, rid, created, chat)
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        await self._answer_stream(send, receive, model, answer, rid, created, chat, include_usage)

    async def _answer_json(
        self,
        send: Send,
        receive: Receive,
        model: str,
        answer: Answer,
        rid: str,
        created: int,
        chat: bool,
    ) -> None:
        text = "".join(answer.pieces)
        n = len(answer.pieces)
        if model == "slow" and await _pause(receive, self.interval * n):
            self.stats.disconnected += 1
            return
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = answer.finish_reason
        payload = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": _usage(answer.prompt_tokens, n),
        }
        await self._send_whole(send, receive, model, json.dumps(payload, separators=(",", ":")))

    async def _send_whole(self, send: Send, receive: Receive, model: str, text: str) -> None:
        """A whole JSON answer: sent, gzip-encoded, or cut halfway (drop and hang faults)."""
        data = text.encode()
        if model in _CUT:
            await _start(send, 200, [*_JSON, (b"content-length", str(len(data)).encode())])
            await send(
                {"type": "http.response.body", "body": data[: len(data) // 2], "more_body": True}
            )
            await self._cut(model, receive)
            return  # uvicorn closes the connection: the response was not completed
        if model == "gzip":
            await _send_bytes(send, 200, gzip.compress(data), [*_JSON, _GZIP])
        else:
            await _send_bytes(send, 200, data, _JSON)
        self.stats.completed += 1

    async def _cut(self, model: str, receive: Receive) -> None:
        """Stop answering mid-answer: cut the connection (drop-mid-stream), or hold it open
        until the client gives up (hang-mid-stream)."""
        if model == "hang-mid-stream":
            await _until_disconnect(receive)
            self.stats.disconnected += 1
        else:
            self.stats.dropped += 1

    async def _answer_stream(
        self,
        send: Send,
        receive: Receive,
        model: str,
        answer: Answer,
        rid: str,
        created: int,
        chat: bool,
        include_usage: bool,
    ) -> None:
        head: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
        }
        head |= {"created": created, "model": model}
        last = len(answer.pieces) - 1
        events: list[dict[str, Any]] = []
        if chat:
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}}
            events.append(head | {"choices": [role | {"logprobs": None, "finish_reason": None}]})
        for i, piece in enumerate(answer.pieces):
            finish = answer.finish_reason if i == last else None
            choice: dict[str, Any] = {"index": 0}
            if chat:
                choice["delta"] = {"content": piece}
            else:
                choice["text"] = piece
            choice["logprobs"] = None
            choice["finish_reason"] = finish
            events.append(head | {"choices": [choice]})
        if not answer.pieces:  # nothing to say: one empty chunk carries the finish reason
            empty: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
            empty |= {"delta": {"content": ""}} if chat else {"text": ""}
            events.append(head | {"choices": [empty]})
        if include_usage:
            usage = _usage(answer.prompt_tokens, len(answer.pieces))
            events.append(head | {"choices": [], "usage": usage})

        zipper = await _start_stream(send, model)
        slow = model == "slow"
        cut_at = _CUT_AT if model in _CUT else -1
        bad_at = _CUT_AT if model == "bad-json" else -1
        for i, event in enumerate(events):
            if i == cut_at:
                await self._cut(model, receive)
                return  # uvicorn closes the connection: the response was not completed
            # "slow" pauses before each token after the first (the role chunk rides with it)
            if slow and i > (1 if chat else 0) and await _pause(receive, self.interval):
                self.stats.disconnected += 1
                return
            chunk = b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
            if zipper is not None:
                chunk = zipper.compress(chunk) + zipper.flush(zlib.Z_SYNC_FLUSH)
            elif i == bad_at:
                chunk = _BAD_EVENT + chunk
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        end = b"data: [DONE]\n\n"
        if zipper is not None:
            end = zipper.compress(end) + zipper.flush()
        await send({"type": "http.response.body", "body": end, "more_body": False})
        self.stats.completed += 1

    async def _answer_responses(
        self, send: Send, receive: Receive, model: str, answer: Answer, rid: str, stream: bool
    ) -> None:
        """The Responses API: one JSON response, or vLLM's named events (faults as for chat)."""
        created = int(time.time())
        if not stream:
            if model == "slow" and await _pause(receive, self.interval * len(answer.pieces)):
                self.stats.disconnected += 1
                return
            text = "".join(answer.pieces)
            usage = _responses_usage(answer.prompt_tokens, answer)
            payload = response_object(rid, model, created, text, "completed", usage)
            await self._send_whole(send, receive, model, json.dumps(payload))
            return
        zipper = await _start_stream(send, model)
        for i, event in enumerate(response_events(rid, model, created, answer)):
            if model in _CUT and i == 5:  # after the first text delta
                await self._cut(model, receive)
                return  # uvicorn closes the connection: the response was not completed
            delta = event["type"] == "response.output_text.delta"
            if model == "slow" and delta and await _pause(receive, self.interval):
                self.stats.disconnected += 1
                return
            chunk = f"event: {event['type']}\ndata: ".encode() + json.dumps(event).encode()
            chunk += b"\n\n"
            if model == "bad-json" and i == 5:
                chunk = _BAD_RESPONSES_EVENT + chunk
            if zipper is not None:
                chunk = zipper.compress(chunk) + zipper.flush(zlib.Z_SYNC_FLUSH)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        end = zipper.flush() if zipper is not None else b""
        await send({"type": "http.response.body", "body": end, "more_body": False})
        self.stats.completed += 1


async def _start_stream(send: Send, model: str) -> Any:
    """Start an SSE answer; for the gzip fault, return the compressor its chunks go through
    (wbits 31: gzip framing), else None."""
    zipper = zlib.compressobj(wbits=31) if model == "gzip" else None
    await _start(send, 200, _SSE if zipper is None else [*_SSE, _GZIP])
    return zipper


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _pause(receive: Receive, seconds: float) -> bool:
    """Sleep `seconds`, waking early if the client disconnects; True means it disconnected."""
    try:
        message = await asyncio.wait_for(receive(), timeout=seconds)
    except TimeoutError:
        return False
    return message["type"] == "http.disconnect"


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _start(send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _send_bytes(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await _start(send, status, headers)
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_json(send: Send, status: int, payload: Any) -> None:
    await _send_bytes(send, status, json.dumps(payload).encode(), _JSON)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class _HideDrops(logging.Filter):
    """drop-mid-stream cuts connections on purpose; keep uvicorn from logging it as an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _DROP_LOG


class _Server(uvicorn.Server):
    """Prints `READY <base url>` once listening (the real port when started with --port 0)."""

    def __init__(self, config: uvicorn.Config, host: str) -> None:
        super().__init__(config)
        self.host = host

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            port = self.servers[0].sockets[0].getsockname()[1]
            print(f"READY http://{self.host}:{port}/v1", flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (printed)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per normal answer")
    parser.add_argument(
        "--token-interval-ms", type=float, default=50.0, help="pause between chunks for 'slow'"
    )
    parser.add_argument(
        "--fault",
        choices=FAULT_MODELS,
        default=None,
        help="answer every request as this model would be answered (a failing replica)",
    )


def run(args: argparse.Namespace) -> int:
    app = Responder(tokens=args.tokens, token_interval_ms=args.token_interval_ms, fault=args.fault)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        backlog=4096,
    )
    server = _Server(config, args.host)
    logging.getLogger("uvicorn.error").addFilter(_HideDrops())

    server.run()
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m ptst.bench.responder", description=__doc__)
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
