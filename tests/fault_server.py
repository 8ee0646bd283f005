"""An upstream that writes raw HTTP/1.1 bytes, for the faults an ASGI server cannot produce:
interim 1xx answers in their own packet before the real one, a connection closed before any
answer, a status line that is not HTTP, megabytes of headers; and a listener that never
accepts, where connecting hangs. bench/responder.py serves every other fault.

Like the responder, the request's `model` picks the behaviour:

    parrot          200: the last user message (the prompt on /v1/completions), word for word,
                    as one JSON answer or an SSE stream in the shape of the endpoint asked
                    (chat, completions, or responses)
    interim-100     `HTTP/1.1 100 Continue`, a pause, then what parrot answers
    interim-103     `HTTP/1.1 103 Early Hints` with a Link header, a pause, then parrot's answer
    empty-reply     the connection is closed once the request is read: not one byte back
    not-http        a line that is not an HTTP status line, then the connection is closed
    huge-header     parrot's answer with one more header, its value HUGE_HEADER bytes long
    many-headers    parrot's answer with small headers adding up to HUGE_HEADER bytes

Connections are kept alive (Content-Length bodies, chunked streams), so a client that mistook
an interim answer for the final one reads the real answer as the next request's. It runs its
own event loop on a thread, binds 127.0.0.1 on a free port, and counts requests by model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ptst.bench.responder import (
    Answer,
    last_user_text,
    response_events,
    response_object,
    responses_as_chat,
    split_pieces,
)

BEHAVIOURS = (
    "parrot",
    "interim-100",
    "interim-103",
    "empty-reply",
    "not-http",
    "huge-header",
    "many-headers",
)
HUGE_HEADER = 2 * 1024 * 1024
INTERIM = {
    "interim-100": b"HTTP/1.1 100 Continue\r\n\r\n",
    "interim-103": b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n",
}
PACKET_GAP_S = 0.05  # between an interim answer and the real one: they arrive as two reads


class FaultServer:
    """Start with `with FaultServer() as server:`; `server.url` is the base URL (…/v1)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.requests: Counter[str] = Counter()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FaultServer:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._connection, "127.0.0.1", 0), self.loop
        )
        self._server = started.result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for writer in self._writers:
                writer.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while (request := await read_request(reader)) is not None:
                path, body = request
                model = body.get("model") if isinstance(body, dict) else None
                model = model if model in BEHAVIOURS else "parrot"
                self.requests[model] += 1
                if not await answer(writer, model, body, path):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


@dataclass
class Request:
    """One request as it came off the wire: its request line, headers (lower-cased names) and
    body (a chunked one joined)."""

    line: str
    headers: dict[str, str]
    body: bytes


async def read_raw_request(reader: asyncio.StreamReader) -> Request | None:
    """The next request on the connection, or None once the client closed it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    first, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        raw = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            raw += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
    else:
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(first, headers, raw)


async def read_request(reader: asyncio.StreamReader) -> tuple[str, Any] | None:
    """The path and JSON body of the next request on the connection (None once the client
    closed)."""
    request = await read_raw_request(reader)
    if request is None:
        return None
    line = request.line
    path = line.split(" ")[1] if line.count(" ") >= 2 else "/"
    try:
        return path, json.loads(request.body) if request.body else {}
    except ValueError:
        return path, {}


async def answer(writer: asyncio.StreamWriter, model: str, body: Any, path: str) -> bool:
    """Write the behaviour's bytes; False when the connection is to be closed."""
    if model == "empty-reply":
        return False
    if model == "not-http":
        writer.write(b"220 mail.example.com ESMTP ready\r\n")
        await writer.drain()
        return False
    if model in INTERIM:
        writer.write(INTERIM[model])
        await writer.drain()
        await asyncio.sleep(PACKET_GAP_S)
    extra = b""
    if model == "huge-header":
        extra = b"x-huge: " + b"a" * HUGE_HEADER + b"\r\n"
    elif model == "many-headers":
        extra = b"".join(b"x-h%d: %s\r\n" % (i, b"b" * 40) for i in range(HUGE_HEADER // 48))
    body = body if isinstance(body, dict) else {}
    shape = "responses" if path.endswith("/responses") else "chat"
    shape = "completions" if path.endswith("/v1/completions") else shape
    if body.get("stream"):
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        writer.write(head + b"transfer-encoding: chunked\r\n" + extra + b"\r\n")
        for item in stream_events(shape, model, body):  # one HTTP chunk each
            writer.write(b"%x\r\n%s\r\n" % (len(item), item))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
    else:
        data = json.dumps(whole_answer(shape, model, body)).encode()
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + extra
        writer.write(head + b"content-length: %d\r\n\r\n" % len(data) + data)
    await writer.drain()
    return True


def parrot(shape: str, body: dict[str, Any]) -> Answer:
    """The last user message (the prompt for /v1/completions), one word per piece."""
    if shape == "responses":
        text = last_user_text(responses_as_chat(body), chat=True)
    else:
        text = last_user_text(body, chat=shape == "chat")
    pieces = split_pieces(text) if text else []
    return Answer(pieces, "stop", len(pieces))


def whole_answer(shape: str, model: str, body: dict[str, Any]) -> dict[str, Any]:
    """One JSON answer in the endpoint's shape."""
    answer = parrot(shape, body)
    text, n = "".join(answer.pieces), len(answer.pieces)
    if shape == "responses":
        usage = {"input_tokens": n, "output_tokens": n, "total_tokens": 2 * n}
        return response_object("resp_fault", model, 0, text, "completed", usage)
    choice: dict[str, Any] = {"index": 0}
    if shape == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice |= {"logprobs": None, "finish_reason": "stop"}
    return {
        "id": "chatcmpl-fault" if shape == "chat" else "cmpl-fault",
        "object": "chat.completion" if shape == "chat" else "text_completion",
        "created": 0,
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": n, "completion_tokens": n, "total_tokens": 2 * n},
    }


def stream_events(shape: str, model: str, body: dict[str, Any]) -> list[bytes]:
    """The stream in the endpoint's shape: one piece per event, chat's role on the first, the
    usage chunk when asked for, then [DONE]; or vLLM's named Responses events."""
    answer = parrot(shape, body)
    if shape == "responses":
        events = response_events("resp_fault", model, 0, answer)
        return [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events]
    chat = shape == "chat"
    chunks = [chunk(model, chat, "")]
    if chat:
        chunks[0]["choices"][0]["delta"] = {"role": "assistant", "content": ""}
    chunks += [chunk(model, chat, piece) for piece in answer.pieces]
    chunks.append(chunk(model, chat, "", "stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        n = len(answer.pieces)
        usage = {"prompt_tokens": n, "completion_tokens": n, "total_tokens": 2 * n}
        chunks.append(chunk(model, chat, "") | {"choices": [], "usage": usage})
    return [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def chunk(model: str, chat: bool, text: str, finish: str | None = None) -> dict[str, Any]:
    """One stream event: a chat.completion.chunk whose delta holds `text` (none on the
    finishing chunk), or a text_completion chunk for /v1/completions."""
    choice: dict[str, Any] = {"index": 0}
    if chat:
        choice["delta"] = {} if finish else {"content": text}
    else:
        choice["text"] = text
    choice |= {"logprobs": None, "finish_reason": finish}
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": "chatcmpl-fault" if chat else "cmpl-fault", "object": kind, "created": 0}
    return head | {"model": model, "choices": [choice]}


@contextlib.contextmanager
def unaccepting_listener() -> Iterator[str]:
    """A base URL whose port listens but never accepts, its accept queue already full: a TCP
    connect there gets no answer (the kernel drops the SYN), so connecting hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=5)  # fills the queue
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        filler.close()
        listener.close()
