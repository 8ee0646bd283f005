"""Stopping without cutting answers off mid-word. On SIGTERM (or Ctrl-C) uvicorn stops accepting
connections and waits for the open ones; this module gives the requests still running a
deadline (`server.shutdown_timeout_s`). A request that ends before it is untouched. At the
deadline each one still running is cancelled (which cancels its upstream call and writes its
log record, as a client disconnect does) and ended the OpenAI way: a stream with an error event
(and `data: [DONE]` for chat and completions), an answer not yet started with a 503. Then
uvicorn runs the lifespan shutdown, which flushes the refusal log.

uvicorn's own graceful-shutdown timeout is set a little later than the deadline, as a backstop
(a client that stopped reading its stream); at its timeout it cancels without a last word.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ptst.proxy import jsonfast
from ptst.proxy.answers import responses_error_event
from ptst.proxy.errors import error_body
from ptst.proxy.sse import DONE, event

log = logging.getLogger("ptst.drain")

# After the deadline uvicorn still needs to send the last words and run the lifespan shutdown.
BACKSTOP_S = 5.0
SHUTDOWN_MESSAGE = "the proxy is shutting down"


class Drain:
    """The shutdown deadline and the requests it applies to (one per app)."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.draining = False
        self.expired = False  # the deadline passed: what is cut off now, it cut off
        self.active: set[_Request] = set()

    def begin(self) -> None:
        """Shutdown started: the deadline runs from now (a second signal changes nothing)."""
        if self.draining:
            return
        self.draining = True
        log.info(
            "shutting down: %d request(s) in flight have up to %.1f s to finish",
            len(self.active),
            self.deadline_s,
        )
        asyncio.get_running_loop().call_later(self.deadline_s, self.expire)

    def expire(self) -> None:
        self.expired = True
        if self.active:
            log.warning(
                "shutdown deadline (%.1f s) passed: ending %d request(s) still running",
                self.deadline_s,
                len(self.active),
            )
        for request in list(self.active):
            request.expire()

    @contextlib.contextmanager
    def on_signals(self) -> Iterator[None]:
        """While inside, SIGTERM and SIGINT also start the deadline. The handlers installed
        before (uvicorn's, which stop accepting and wait) still run first; a signal whose
        handler is not Python's own (the default: the process dies) is left alone."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signals can only be handled in the main thread (an in-process test client)
            return
        loop = asyncio.get_running_loop()
        previous: dict[int, Any] = {}

        def handler(signum: int, frame: FrameType | None) -> None:
            previous[signum](signum, frame)
            loop.call_soon_threadsafe(self.begin)

        for sig in (signal.SIGTERM, signal.SIGINT):
            if callable(signal.getsignal(sig)):
                previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)


class _Request:
    """One request in flight: what its answer has sent so far, and how to end it."""

    __slots__ = ("_send", "complete", "expired", "path", "started", "stream", "task")

    def __init__(self, task: asyncio.Task[Any] | None, send: Send, path: str) -> None:
        self.task = task
        self._send = send
        self.path = path
        self.started = self.stream = self.complete = self.expired = False

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            for name, value in message.get("headers", ()):
                if name == b"content-type":
                    self.stream = value.startswith(b"text/event-stream")
                    break
        elif kind == "http.response.body" and not message.get("more_body", False):
            self.complete = True
        await self._send(message)

    def expire(self) -> None:
        if self.complete or self.task is None:
            return
        self.expired = True
        self.task.cancel(msg=SHUTDOWN_MESSAGE)

    async def last_word(self) -> None:
        """End the answer after its handler was cancelled at the deadline."""
        send = self._send
        if not self.started:
            body = error_body(
                f"{SHUTDOWN_MESSAGE}; retry the request",
                "service_unavailable",
                code="shutting_down",
            )
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": jsonfast.dumps(body)})
            return
        if self.complete:
            return
        tail = b""
        if self.stream:
            body = error_body(
                f"{SHUTDOWN_MESSAGE}: the answer was cut at its shutdown deadline",
                "service_unavailable",
                code="shutting_down",
            )
            tail = responses_error_event(body) if self.path == "/v1/responses" else event(body)
            tail += b"" if self.path == "/v1/responses" else DONE
        await send({"type": "http.response.body", "body": tail, "more_body": False})


class DrainMiddleware:
    """Tracks each HTTP request so that the deadline can end it (pure ASGI: a few attribute
    writes per request and per message on the request path)."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = _Request(asyncio.current_task(), send, scope["path"])
        active = self.drain.active
        active.add(request)
        try:
            await self.app(scope, receive, request.send)
        except asyncio.CancelledError:
            if not request.expired:
                raise
            if request.task is not None:
                request.task.uncancel()
            await request.last_word()
        finally:
            active.discard(request)
