"""A small HTTP/1.1 client for the upstream hop: keep-alive connections per origin, responses
parsed by httptools (the parser uvicorn runs on), bodies read whole or piece by piece.

Why not aiohttp: profiled here at 32 concurrent keep-alive connections, aiohttp's per-request
machinery (request/response objects, payload registry, stream readers, timers) was about half
of the proxy's CPU per request. The upstream hop needs far less: one POST or GET on a pooled
connection, a status, a body. Each connection is its own asyncio protocol; a request is one
write, and the response wakes one future when the caller has something to wait for. The
proxy sends POST and GET only (no HEAD, no Expect: 100-continue).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

PAUSE_AT = 1 << 20  # bytes buffered before reading from the upstream pauses (flow control)
# uvicorn (vLLM's server) closes a keep-alive connection after 5 s idle; a request written onto
# one as it closes would fail, so connections idle this long are closed instead of reused.
KEEPALIVE_S = 4.0


class ConnectError(OSError):
    """The upstream could not be reached: nothing was sent."""


class ProtocolError(Exception):
    """The upstream broke HTTP: a malformed answer, or a connection cut mid-answer."""


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def split_url(url: str) -> tuple[Origin, str]:
    """`http://h:p/v1/x?q` -> (Origin, "/v1/x?q")."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(parts.scheme, parts.hostname, port), path


class Connection(asyncio.Protocol):
    """One keep-alive connection; it carries one request at a time, and is that request's
    response while the request is in flight."""

    def __init__(self, origin: Origin, read_timeout: float) -> None:
        self.origin = origin
        self.read_timeout = read_timeout
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.alive = False
        self.idle_since = 0.0
        self.requests = 0  # sent on this connection so far
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.received = False  # any byte of the response
        self.framed = False  # Content-Length or chunked; else the body ends when the socket does
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports quack alike
        self.alive = True

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"malformed HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        if self.status and not self.framed and exc is None and self.error is None:
            self.complete = True  # a close-delimited body (httptools cannot be told of EOF)
        if not self.complete and self.error is None:
            when = "mid-answer" if self.received else "before answering"
            why = f": {exc}" if exc else ""
            self.error = ProtocolError(f"the upstream closed the connection {when}{why}")
        self._wake()

    # --- httptools callbacks ---

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > PAUSE_AT and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # --- the caller's side ---

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self._reset()
        self.requests += 1
        self.transport.write(request)

    async def wait_status(self) -> int:
        while not self.status and self.error is None:
            await self._wait()
        if not self.status and self.error is not None:
            raise self.error
        return self.status

    async def read(self) -> bytes:
        """The whole body."""
        while not self.complete:
            if self.error is not None:
                raise self.error
            self.buffered = 0  # all of it is wanted: no reason to pause reading
            self._resume()
            await self._wait()
        self.buffered = 0
        self._resume()
        body = b"".join(self.body)
        self.body.clear()
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body in the pieces the network delivers, as they arrive."""
        while True:
            while self.body:
                piece = self.body.popleft()
                self.buffered -= len(piece)
                yield piece
            self._resume()
            if self.complete:
                return
            if self.error is not None:
                raise self.error
            await self._wait()

    @property
    def reusable(self) -> bool:
        return self.alive and self.complete and self.keep_alive and self.error is None

    def close(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.close()

    # --- internals ---

    def _fail(self, error: Exception) -> None:
        self.error = error
        self.close()
        self._wake()

    def _resume(self) -> None:
        if self.paused and self.buffered < PAUSE_AT // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        """Until the parser or the connection has news, or the read timeout passes."""
        loop = asyncio.get_running_loop()
        self.waiter = waiter = loop.create_future()
        timer = loop.call_later(self.read_timeout, self._timed_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(
                TimeoutError(f"no data from the upstream for {self.read_timeout:g} s")
            )


class Client:
    """Pooled connections to any number of origins, at most `max_connections` open at once."""

    def __init__(self, max_connections: int, connect_timeout: float, read_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.slots = asyncio.Semaphore(max_connections)
        self.idle: dict[Origin, list[Connection]] = {}
        self._tls: ssl.SSLContext | None = None

    async def request(
        self,
        method: str,
        url: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        read_timeout: float | None = None,
    ) -> Connection:
        """Send a request; return its connection once the response status arrived. The caller
        must hand the connection back with `release`, read or not."""
        origin, path = split_url(url)
        lines = [f"{method} {path} HTTP/1.1", f"host: {origin.authority}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method not in ("GET", "HEAD"):
            lines.append(f"content-length: {len(body)}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        conn = await self._acquire(origin)
        try:
            return await self._exchange(conn, request, read_timeout)
        except ProtocolError:
            # A kept-alive connection the upstream closed as the request went out, with no byte
            # of an answer: how an idle-connection close shows, so the request was most likely
            # not served. Once more, on a new connection.
            if conn.requests == 1 or conn.received:
                raise
        return await self._exchange(await self._new(origin), request, read_timeout)

    async def _exchange(
        self, conn: Connection, request: bytes, read_timeout: float | None
    ) -> Connection:
        conn.read_timeout = read_timeout or self.read_timeout
        try:
            conn.send(request)
            await conn.wait_status()
        except BaseException:
            self.release(conn)
            raise
        return conn

    def release(self, conn: Connection) -> None:
        """Keep a connection whose response was read to the end; close any other (which
        aborts what the upstream was still doing for it)."""
        if conn.reusable:
            conn.idle_since = time.monotonic()
            self.idle.setdefault(conn.origin, []).append(conn)
        else:
            conn.close()
            self.slots.release()

    async def _acquire(self, origin: Origin) -> Connection:
        idle = self.idle.get(origin)
        if idle:
            now = time.monotonic()
            if len(idle) > 1 and now - idle[0].idle_since >= KEEPALIVE_S:
                self._drop(idle.pop(0))  # the longest idle: one per call keeps the pool lean
            while idle:
                conn = idle.pop()  # the most recently used
                if conn.alive and now - conn.idle_since < KEEPALIVE_S:
                    return conn
                self._drop(conn)
        return await self._new(origin)

    async def _new(self, origin: Origin) -> Connection:
        if self.slots.locked():
            self._evict_one()  # every slot held: an idle connection elsewhere makes room
        await self.slots.acquire()
        try:
            return await self._connect(origin)
        except BaseException:
            self.slots.release()
            raise

    async def _connect(self, origin: Origin) -> Connection:
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if origin.scheme == "https" else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(origin, self.read_timeout), origin.host, origin.port, ssl=tls
                )
        except TimeoutError as exc:
            raise ConnectError(f"connecting to {origin.authority} timed out") from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {origin.authority}: {exc}") from exc
        return conn

    def _drop(self, conn: Connection) -> None:
        conn.close()
        self.slots.release()

    def _evict_one(self) -> None:
        for conns in self.idle.values():
            if conns:
                self._drop(conns.pop(0))
                return

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def close(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
        self.idle.clear()
