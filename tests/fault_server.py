"""An upstream that writes raw HTTP/1.1 bytes, for the faults an ASGI server cannot produce:
interim 1xx answers in their own packet before the real one, a connection closed before any
answer, a status line that is not HTTP, headers without end; and a listener that never
accepts, where connecting hangs. bench/responder.py serves every other fault.

Like the responder, the request's `model` picks the behaviour:

    parrot          200: the last user message (the prompt on /v1/completions), word for word,
                    as one JSON answer or an SSE stream in that endpoint's shape
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
from typing import Any

from ptst.bench.responder import last_user_text, split_pieces

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
                if not await answer(writer, model, body, not path.endswith("/v1/completions")):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[str, Any] | None:
    """The path and JSON body of the next request on the connection (None once the client
    closed)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    first, *lines = head.decode("latin-1").split("\r\n")
    path = first.split(" ")[1] if first.count(" ") >= 2 else "/"
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
    try:
        return path, json.loads(raw) if raw else {}
    except ValueError:
        return path, {}


async def answer(writer: asyncio.StreamWriter, model: str, body: Any, chat: bool) -> bool:
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
    text = (last_user_text(body, chat) if isinstance(body, dict) else None) or ""
    if isinstance(body, dict) and body.get("stream"):
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        await write_stream(writer, model, text, chat, usage, extra)
    else:
        writer.write(json_answer(model, text, chat, extra))
        await writer.drain()
    return True


def completion(model: str, text: str, chat: bool) -> dict[str, Any]:
    """A whole answer: a chat.completion, or a text_completion for /v1/completions."""
    choice: dict[str, Any] = {"index": 0}
    choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    choice |= {"logprobs": None, "finish_reason": "stop"}
    n = len(split_pieces(text)) if text else 0
    usage = {"prompt_tokens": n, "completion_tokens": n, "total_tokens": 2 * n}
    return {
        "id": "chatcmpl-fault" if chat else "cmpl-fault",
        "object": "chat.completion" if chat else "text_completion",
        "created": 0,
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def json_answer(model: str, text: str, chat: bool, extra_headers: bytes = b"") -> bytes:
    data = json.dumps(completion(model, text, chat)).encode()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + extra_headers
    return head + b"content-length: %d\r\n\r\n" % len(data) + data


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


async def write_stream(
    writer: asyncio.StreamWriter,
    model: str,
    text: str,
    chat: bool,
    usage: bool,
    extra_headers: bytes = b"",
) -> None:
    """The stream of `text`, one word per event, each in an HTTP chunk of its own."""
    pieces = split_pieces(text) if text else []
    events = [chunk(model, chat, "")]
    if chat:  # the role rides on the first chat chunk, as vLLM sends it
        events[0]["choices"][0]["delta"] = {"role": "assistant", "content": ""}
    events += [chunk(model, chat, p) for p in pieces]
    events.append(chunk(model, chat, "", "stop"))
    if usage:
        n = len(pieces)
        counts = {"prompt_tokens": n, "completion_tokens": n, "total_tokens": 2 * n}
        events.append(chunk(model, chat, "") | {"choices": [], "usage": counts})
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
    writer.write(head + extra_headers + b"\r\n")
    items = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events]
    for item in [*items, b"data: [DONE]\n\n"]:
        writer.write(b"%x\r\n%s\r\n" % (len(item), item))
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()


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
