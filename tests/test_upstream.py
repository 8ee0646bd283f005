"""The upstream hop (proxy/upstream.py, on aiohttp) against raw loopback servers started per test:
what goes out, what comes back byte by byte, timeouts by phase, replicas and their cooldown."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from ptst.proxy.config import Route, ServerSettings, Timeouts
from ptst.proxy.errors import (
    UpstreamError,
    UpstreamRejected,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ptst.proxy.upstream import Call, Upstreams, transport_error
from tests.fault_server import Request, read_raw_request
from tests.servers import free_port

LIMIT = 2.0  # seconds any one test may take; a hang fails instead of stalling the suite

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Server:
    host: str = "127.0.0.1"
    port: int = 0
    accepted: int = 0
    scheme: str = "http"
    errors: list[BaseException] = field(default_factory=list)

    def url(self, path: str = "/") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{path}"


@contextlib.asynccontextmanager
async def serve(
    handler: Handler, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
) -> AsyncIterator[Server]:
    """A loopback server on a free port; each connection runs `handler` and is closed after.
    On exit every connection is closed and every handler finished; a handler's exception (a
    failed assert on what the client sent) fails the test."""
    info = Server(host, scheme="https" if tls else "http")
    writers: list[asyncio.StreamWriter] = []
    tasks: list[asyncio.Task[Any]] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info.accepted += 1
        writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        try:
            await handler(reader, writer)
        except asyncio.CancelledError:
            pass  # stopped at teardown
        except Exception as exc:
            info.errors.append(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, host, 0, ssl=tls)
    info.port = server.sockets[0].getsockname()[1]
    try:
        yield info
    finally:
        server.close()
        for writer in writers:
            writer.close()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=0.5)
            for task in pending:
                task.cancel()
            await asyncio.wait(tasks)
        await server.wait_closed()
    assert info.errors == []


class Answering:
    """A handler that answers each request on a connection with the next response in turn
    (the last one repeats), recording the requests; hangs up after one answer if asked."""

    def __init__(self, *responses: bytes, close_after: bool = False) -> None:
        self.responses = responses
        self.close_after = close_after
        self.requests: list[Request] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        while (request := await read_raw_request(reader)) is not None:
            self.requests.append(request)
            writer.write(self.responses[min(served, len(self.responses) - 1)])
            await writer.drain()
            served += 1
            if self.close_after:
                return


def ok(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\n{head}\r\n".encode() + body


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(LIMIT):
            await main()

    asyncio.run(bounded())


FAST = Timeouts(connect=1.0, pool=1.0, first_byte=1.0, between_chunks=0.5)
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def route(*urls: str, timeouts: Timeouts = FAST, **fields: Any) -> Route:
    return Route(model="m", upstream=list(urls), timeouts=timeouts, **fields)


@contextlib.asynccontextmanager
async def upstreams(**settings: Any) -> AsyncIterator[Upstreams]:
    ups = Upstreams(ServerSettings(**settings))
    try:
        yield ups
    finally:
        await ups.aclose()


async def fetch(ups: Upstreams, r: Route, headers: dict[str, str] | None = None) -> bytes:
    call = await ups.open(r, "/chat/completions", BODY, headers or {})
    try:
        raw, _ = await call.read_json()
    finally:
        await call.close()
    return raw


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


# --- what goes out ---


def test_post_carries_json_identity_key_and_trace_headers() -> None:
    handler = Answering(ok(b'{"answer": 42}', "content-type: application/json"))
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    async def main() -> None:
        async with serve(handler) as server, upstreams() as ups:
            r = route(server.url("/v1"), api_key="sk-upstream")
            raw = await fetch(ups, r, {"x-request-id": "req-1", "traceparent": parent})
            assert raw == b'{"answer": 42}'
            assert ups.outstanding[server.url("/v1")] == 0

    run(main)
    (request,) = handler.requests
    assert request.line == "POST /v1/chat/completions HTTP/1.1"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept-encoding"] == "identity"
    assert request.headers["authorization"] == "Bearer sk-upstream"
    assert request.headers["x-request-id"] == "req-1"
    assert request.headers["traceparent"] == parent
    assert request.headers["host"].startswith("127.0.0.1:")
    assert request.body == b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


def test_keep_alive_connection_is_reused() -> None:
    handler = Answering(ok(b"{}"))

    async def main() -> None:
        async with serve(handler) as server, upstreams() as ups:
            for _ in range(3):
                assert await fetch(ups, route(server.url("/v1"))) == b"{}"
            assert server.accepted == 1

    run(main)


def test_an_upstreams_cookies_are_not_kept() -> None:
    """The session is shared by every client: a cookie one upstream answer sets must never ride
    on a later request (another client's). By host name: aiohttp's jar ignores IP addresses."""
    handler = Answering(ok(b"{}", "set-cookie: session=client-a; Path=/"))

    async def main() -> None:
        async with serve(handler) as server, upstreams() as ups:
            by_name = f"http://localhost:{server.port}/v1"
            for _ in range(2):
                assert await fetch(ups, route(by_name)) == b"{}"

    run(main)
    assert [r.headers.get("cookie") for r in handler.requests] == [None, None]


def test_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP_PROXY is honoured: the proxy server sees the absolute URL of the upstream."""
    handler = Answering(ok(b"{}"))
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)

    async def main() -> None:
        async with serve(handler) as proxy_server:
            monkeypatch.setenv("HTTP_PROXY", proxy_server.url())
            async with upstreams() as ups:
                assert await fetch(ups, route("http://upstream.invalid:8000/v1")) == b"{}"

    run(main)
    assert handler.requests[0].line == (
        "POST http://upstream.invalid:8000/v1/chat/completions HTTP/1.1"
    )


# --- what comes back ---


def test_interim_1xx_answers_are_skipped_and_the_connection_stays_in_step() -> None:
    """100 and 103 in packets of their own are not the answer; the real one is read, and the
    next request on the same connection gets its own answer."""
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        while await read_raw_request(reader) is not None:
            served += 1
            for interim in (
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n",
            ):
                writer.write(interim)
                await writer.drain()
                await asyncio.sleep(0.05)
            writer.write(ok(b'{"n": %d}' % served))
            await writer.drain()

    async def main() -> None:
        async with serve(handler) as server, upstreams() as ups:
            r = route(server.url("/v1"))
            assert await fetch(ups, r) == b'{"n": 1}'
            assert await fetch(ups, r) == b'{"n": 2}'
            assert server.accepted == 1

    run(main)


def test_gzip_body_is_decoded() -> None:
    handler = Answering(ok(gzip.compress(b'{"x": 1}'), "content-encoding: gzip"))

    async def main() -> None:
        async with serve(handler) as server, upstreams() as ups:
            call = await ups.open(route(server.url("/v1")), "/chat/completions", BODY, {})
            raw, data = await call.read_json()
            await call.close()
            assert (raw, data) == (b'{"x": 1}', {"x": 1})

    run(main)


def test_stream_pieces_arrive_as_sent() -> None:
    events = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_raw_request(reader)
        writer.write(STREAM_HEAD)
        for event in events:
            writer.write(chunked(event))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with serve(handler) as server, upstreams() as ups:
            call = await ups.open(route(server.url("/v1")), "/chat/completions", BODY, {})
            got = [piece async for piece in call.chunks()]
            await call.close()
            assert got == events

    run(main)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b",  # cut mid-body
        b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\nnot json at ",  # 200, not JSON
        b"SMTP ready\r\n\r\n",  # not HTTP at all
        b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 20_000 + b"\r\n\r\n",  # a header over the cap
        b"HTTP/1.1 200 OK\r\n" + b"x-h: 1\r\n" * 500 + b"content-length: 2\r\n\r\n{}",  # too many
    ],
    ids=["cut-mid-body", "not-json", "not-http", "header-too-long", "too-many-headers"],
)
def test_broken_answers_are_upstream_errors(answer: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_raw_request(reader)
        writer.write(answer)
        await writer.drain()

    async def main() -> None:
        async with serve(handler) as server, upstreams() as ups:
            with pytest.raises(UpstreamError) as caught:
                await fetch(ups, route(server.url("/v1")))
            assert caught.value.status_code == 502

    run(main)


def test_a_redirect_is_not_followed() -> None:
    """A 3xx is an upstream error naming where it pointed: the request (and its API key) is
    not sent on to another address the operator never configured."""
    elsewhere = Answering(ok(b"{}"))

    async def main() -> None:
        async with serve(elsewhere) as other:
            where = other.url("/v1/chat/completions")
            moved = ok(b"", f"location: {where}", status="307 Temporary Redirect")
            async with serve(Answering(moved)) as server, upstreams() as ups:
                with pytest.raises(UpstreamStatus, match=re.escape(f"redirected to {where}")):
                    await fetch(ups, route(server.url("/v1"), api_key="sk-upstream"))

    run(main)
    assert elsewhere.requests == []


def test_a_health_check_does_not_follow_a_redirect() -> None:
    """A /health that redirects reads as not ready; the address it names hears nothing."""
    elsewhere = Answering(ok(b"{}"))

    async def main() -> None:
        async with serve(elsewhere) as other:
            moved = ok(b"", f"location: {other.url('/health')}", status="302 Found")
            async with serve(Answering(moved)) as server, upstreams() as ups:
                assert not await ups.get_health(server.url("/v1"))

    run(main)
    assert elsewhere.requests == []


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_passed_back(status: int) -> None:
    answer = ok(b'{"error": {"message": "busy"}}', "retry-after: 7", status=f"{status} Busy")
    handler = Answering(answer)

    async def main() -> None:
        async with serve(handler) as server, upstreams() as ups:
            with pytest.raises(UpstreamError if status == 503 else UpstreamRejected) as caught:
                await fetch(ups, route(server.url("/v1")))
            assert caught.value.status_code == status
            assert caught.value.headers == {"retry-after": "7"}
            assert "busy" in caught.value.message

    run(main)


def test_a_client_error_is_not_retried_on_another_replica() -> None:
    bad = Answering(ok(b'{"error": {"message": "too long"}}', status="400 Bad Request"))
    good = Answering(ok(b"{}"))

    async def main() -> None:
        async with serve(bad) as one, serve(good) as two, upstreams() as ups:
            with pytest.raises(UpstreamRejected, match="too long"):
                await fetch(ups, route(one.url("/v1"), two.url("/v1")))

    run(main)
    assert len(good.requests) == 0


# --- timeouts by phase ---


def test_first_byte_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_raw_request(reader)
        await asyncio.sleep(10)

    async def main() -> None:
        async with serve(handler) as server, upstreams() as ups:
            t0 = time.monotonic()
            limits = Timeouts(first_byte=0.3, between_chunks=5.0)
            with pytest.raises(UpstreamTimeout, match="timed out answering"):
                await fetch(ups, route(server.url("/v1"), timeouts=limits))
            assert 0.25 < time.monotonic() - t0 < 1.0

    run(main)


@pytest.mark.parametrize("phase", ["between_chunks", "total"])
def test_stream_timeouts(phase: str) -> None:
    """Between chunks: a stream that stops; total: one that trickles on past the limit."""
    pause = 10.0 if phase == "between_chunks" else 0.05

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_raw_request(reader)
        writer.write(STREAM_HEAD)
        with contextlib.suppress(ConnectionError):  # the client gives up mid-stream
            for _ in range(200):
                writer.write(chunked(b'data: {"n": 1}\n\n'))
                await writer.drain()
                await asyncio.sleep(pause)

    limits = (
        Timeouts(between_chunks=0.3)
        if phase == "between_chunks"
        else Timeouts(between_chunks=5.0, total=0.4)
    )

    async def main() -> None:
        async with serve(handler) as server, upstreams() as ups:
            call = await ups.open(route(server.url("/v1"), timeouts=limits), "/x", BODY, {})
            t0 = time.monotonic()
            with pytest.raises(TimeoutError) as caught:
                async for _ in call.chunks():
                    pass
            await call.close()
            assert time.monotonic() - t0 < 1.0
            assert isinstance(transport_error(caught.value, "u"), UpstreamTimeout)

    run(main)


def test_pool_wait_timeout() -> None:
    """One connection per host: a second request waits for it, and gives up after `pool`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_raw_request(reader)
        writer.write(STREAM_HEAD)
        await writer.drain()
        await asyncio.sleep(10)

    async def main() -> None:
        async with serve(handler) as server, upstreams(max_connections_per_host=1) as ups:
            r = route(server.url("/v1"), timeouts=Timeouts(pool=0.3, connect=0.2))
            first = await ups.open(r, "/x", BODY, {})
            with pytest.raises(UpstreamTimeout, match="connecting"):
                await ups.open(r, "/x", BODY, {})
            await first.close()
            assert server.accepted == 1

    run(main)


# --- replicas ---


def test_nothing_listening_is_unavailable() -> None:
    async def main() -> None:
        async with upstreams() as ups:
            with pytest.raises(UpstreamUnavailable, match="cannot connect"):
                await fetch(ups, route(f"http://127.0.0.1:{free_port()}/v1"))

    run(main)


def test_a_failing_replica_is_skipped_then_cools_down() -> None:
    """A refused replica and a 503 one: the request is served by the third; the failed two go
    last until their cooldown ends, then are tried again."""
    busy = Answering(ok(b'{"error": {"message": "busy"}}', status="503 Busy"))
    good = Answering(ok(b"{}"))

    async def main() -> None:
        dead = f"http://127.0.0.1:{free_port()}/v1"
        async with serve(busy) as one, serve(good) as two, upstreams(cooldown_s=0.3) as ups:
            r = route(dead, one.url("/v1"), two.url("/v1"))
            assert await fetch(ups, r) == b"{}"
            assert ups.order(r) == [two.url("/v1"), dead, one.url("/v1")]
            assert await fetch(ups, r) == b"{}"
            assert (len(busy.requests), len(good.requests)) == (1, 2)
            await asyncio.sleep(0.35)
            assert ups.order(r)[0] == dead
            assert await fetch(ups, r) == b"{}"
            assert (len(busy.requests), len(good.requests)) == (2, 3)

    run(main)


def test_every_replica_failing_gives_the_last_failure() -> None:
    busy = Answering(ok(b'{"error": {"message": "busy"}}', "retry-after: 3", status="503 Busy"))

    async def main() -> None:
        dead = f"http://127.0.0.1:{free_port()}/v1"
        async with serve(busy) as one, upstreams() as ups:
            with pytest.raises(UpstreamUnavailable) as caught:
                await fetch(ups, route(dead, one.url("/v1")))
            assert caught.value.headers == {"retry-after": "3"}

    run(main)


def test_closing_an_unread_answer_drops_its_connection() -> None:
    """Closing mid-stream must not hand the connection back with the rest unread (the next
    request would read the old answer); it is dropped, which aborts the upstream's work."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_raw_request(reader) is not None:
            writer.write(STREAM_HEAD + chunked(b"data: partial\n\n"))
            await writer.drain()

    async def main() -> None:
        async with serve(handler) as server, upstreams() as ups:
            r = route(server.url("/v1"))
            for _ in range(2):
                call: Call = await ups.open(r, "/x", BODY, {})
                await call.close()
            assert server.accepted == 2

    run(main)
