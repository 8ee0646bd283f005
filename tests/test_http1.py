"""The upstream HTTP/1.1 client (proxy/http1.py) against real loopback servers started per test."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from ptst.proxy import http1
from tests.servers import free_port

LIMIT = 2.0  # seconds any one test may take; a hang fails instead of stalling the suite

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Request:
    line: str
    headers: dict[str, str]
    body: bytes


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


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request off the wire, or None once the client closed the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    line, *rest = head.decode("latin-1").split("\r\n")
    headers = {}
    for header in rest:
        if header:
            name, value = header.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(line, headers, body)


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
        while (request := await read_request(reader)) is not None:
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


def client(max_connections: int = 4, read_timeout: float = 1.0) -> http1.Client:
    return http1.Client(
        max_connections=max_connections, connect_timeout=1.0, read_timeout=read_timeout
    )


# --- 1. a Content-Length response ---


def test_content_length_response_read_whole() -> None:
    handler = Answering(
        ok(b'{"answer": 42}', "content-type: application/json", status="201 Created")
    )

    async def main() -> None:
        async with serve(handler) as server:
            c = client()
            conn = await c.request(
                "POST", server.url("/v1/x?q=1"), body=b"ping", headers={"x-test": "yes"}
            )
            assert conn.status == 201
            assert await conn.read() == b'{"answer": 42}'
            assert conn.reusable
            c.release(conn)
            c.close()

    run(main)
    (request,) = handler.requests
    assert request.line == "POST /v1/x?q=1 HTTP/1.1"
    assert request.headers["x-test"] == "yes"
    assert request.headers["content-length"] == "4"
    assert request.headers["host"].startswith("127.0.0.1:")
    assert request.body == b"ping"


def test_get_without_body_sends_no_content_length() -> None:
    handler = Answering(ok(b"fine"))

    async def main() -> None:
        async with serve(handler) as server:
            c = client()
            conn = await c.request("GET", server.url("/health"))
            assert (conn.status, await conn.read()) == (200, b"fine")
            c.release(conn)
            c.close()
            (request,) = handler.requests
            assert request.line == "GET /health HTTP/1.1"
            assert request.headers["host"] == f"127.0.0.1:{server.port}"
            assert "content-length" not in request.headers

    run(main)


def test_read_whole_body_larger_than_the_pause_threshold() -> None:
    body = bytes(range(256)) * (3 * http1.PAUSE_AT // 256)  # 3 MiB

    async def main() -> None:
        async with serve(Answering(ok(body))) as server:
            c = client(read_timeout=0.5)
            conn = await c.request("GET", server.url("/big"))
            assert await conn.read() == body
            c.release(conn)
            c.close()

    run(main)


def test_chunks_of_a_body_larger_than_the_pause_threshold() -> None:
    body = bytes(range(256)) * (3 * http1.PAUSE_AT // 256)  # flow control pauses and resumes

    async def main() -> None:
        async with serve(Answering(ok(body))) as server:
            c = client(read_timeout=0.5)
            conn = await c.request("GET", server.url("/big"))
            got = bytearray()
            async for piece in conn.chunks():
                got += piece
            assert got == body
            assert conn.reusable
            c.release(conn)
            c.close()

    run(main)


def test_body_delimited_by_close() -> None:
    handler = Answering(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil eof", close_after=True)

    async def main() -> None:
        async with serve(handler) as server:
            c = client()
            conn = await c.request("GET", server.url("/"))
            assert await conn.read() == b"until eof"
            c.release(conn)
            c.close()

    run(main)


# --- 2. a chunked response, piece by piece ---


def test_chunked_pieces_arrive_as_sent() -> None:
    got_first = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await read_request(reader) is not None
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await got_first.wait()  # the client holds piece 1 before piece 2 even exists
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        await read_request(reader)  # until the client closes

    async def main() -> None:
        async with serve(handler) as server:
            c = client()
            conn = await c.request("GET", server.url("/stream"))
            assert conn.status == 200
            pieces = conn.chunks()
            assert await anext(pieces) == b"first"
            assert not conn.complete
            got_first.set()
            assert [piece async for piece in pieces] == [b"second"]
            assert conn.complete and conn.reusable
            c.release(conn)
            c.close()

    run(main)


# --- 3. keep-alive reuse ---


def test_keep_alive_connection_is_reused() -> None:
    handler = Answering(ok(b"one"), ok(b"two"))

    async def main() -> None:
        async with serve(handler) as server:
            c = client()
            first = await c.request("GET", server.url("/a"))
            assert await first.read() == b"one"
            c.release(first)
            second = await c.request("GET", server.url("/b"))
            assert await second.read() == b"two"
            c.release(second)
            assert second is first
            assert server.accepted == 1
            c.close()

    run(main)
    assert [r.line for r in handler.requests] == ["GET /a HTTP/1.1", "GET /b HTTP/1.1"]


def test_a_connection_idle_past_the_keepalive_is_not_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http1, "KEEPALIVE_S", 0.1)  # uvicorn closes idle ones after 5 s
    handler = Answering(ok(b"one"), ok(b"two"))

    async def main() -> None:
        async with serve(handler) as server:
            c = client()
            first = await c.request("GET", server.url("/a"))
            assert await first.read() == b"one"
            c.release(first)
            await asyncio.sleep(0.2)
            second = await c.request("GET", server.url("/b"))
            assert await second.read() == b"one"  # a new connection's first answer
            c.release(second)
            assert second is not first and not first.alive
            assert server.accepted == 2
            c.close()

    run(main)


class ClosesItsSecondRequest:
    """The first connection answers one request and hangs up on the next without a byte (an
    idle keep-alive connection closed by the server as the client reused it); later
    connections answer everything."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[Request] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        served = 0
        while (request := await read_request(reader)) is not None:
            self.requests.append(request)
            if first and served == 1:
                return  # closed with no answer
            writer.write(ok(f"answer {len(self.requests)}".encode()))
            await writer.drain()
            served += 1


def test_a_reused_connection_closed_before_answering_is_retried_once() -> None:
    handler = ClosesItsSecondRequest()

    async def main() -> None:
        async with serve(handler) as server:
            c = client()
            first = await c.request("POST", server.url("/a"), b"x")
            assert await first.read() == b"answer 1"
            c.release(first)
            second = await c.request("POST", server.url("/b"), b"y")
            assert await second.read() == b"answer 3"  # sent twice, answered on a new one
            c.release(second)
            assert server.accepted == 2 and second is not first
            c.close()

    run(main)
    assert [r.line for r in handler.requests] == ["POST /a HTTP/1.1", *["POST /b HTTP/1.1"] * 2]


def test_a_reused_connection_cut_mid_answer_is_not_retried() -> None:
    requests: list[Request] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            requests.append(request)
            if len(requests) == 2:
                writer.write(b"HTTP/1.1 2")  # the answer had begun: the request was seen
                await writer.drain()
                return
            writer.write(ok(b"first"))
            await writer.drain()

    async def main() -> None:
        async with serve(handler) as server:
            c = client()
            first = await c.request("POST", server.url("/a"), b"x")
            assert await first.read() == b"first"
            c.release(first)
            with pytest.raises(http1.ProtocolError):
                await c.request("POST", server.url("/b"), b"y")
            assert server.accepted == 1
            c.close()

    run(main)
    assert len(requests) == 2


def test_a_new_connection_closed_before_answering_is_not_retried() -> None:
    requests: list[Request] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)  # then hang up without a byte
        assert request is not None
        requests.append(request)

    async def main() -> None:
        async with serve(handler) as server:
            c = client()
            with pytest.raises(http1.ProtocolError, match="closed the connection"):
                await c.request("POST", server.url("/a"), b"x")
            assert server.accepted == 1
            c.close()

    run(main)
    assert len(requests) == 1


def test_https_upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An https:// upstream is verified against the system's CAs (SSL_CERT_FILE here)."""
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    handler = Answering(ok(b"secure"))

    async def main(trusted: bool) -> None:
        async with serve(handler, tls=server_tls) as server:
            c = client()
            if trusted:
                conn = await c.request("GET", server.url("/x"))
                assert await conn.read() == b"secure"
                c.release(conn)
            else:
                with pytest.raises(http1.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await c.request("GET", server.url("/x"))
            c.close()

    run(lambda: main(trusted=False))  # a self-signed upstream is refused
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    run(lambda: main(trusted=True))
    assert handler.requests[-1].headers["host"].startswith("127.0.0.1:")


def test_connection_close_response_is_not_reused() -> None:
    handler = Answering(ok(b"bye", "connection: close"), close_after=True)

    async def main() -> None:
        async with serve(handler) as server:
            c = client()
            bodies = []
            conns = []
            for _ in range(2):
                conn = await c.request("GET", server.url("/"))
                bodies.append(await conn.read())
                assert not conn.reusable
                c.release(conn)
                conns.append(conn)
            assert bodies == [b"bye", b"bye"]
            assert conns[0] is not conns[1]
            assert server.accepted == 2
            c.close()

    run(main)


# --- 4. a connection cut mid-body ---


def test_connection_cut_mid_body_is_a_protocol_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await read_request(reader) is not None
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")
        await writer.drain()
        # returning closes the connection 90 bytes short

    async def main() -> None:
        async with serve(handler) as server:
            c = client(max_connections=1)
            conn = await c.request("GET", server.url("/"))
            assert conn.status == 200
            with pytest.raises(http1.ProtocolError, match="mid-answer"):
                await conn.read()
            assert not conn.reusable
            c.release(conn)
            # the slot came back: the next request (same cut) does not wait forever for one
            conn = await c.request("GET", server.url("/"))
            with pytest.raises(http1.ProtocolError):
                await conn.read()
            c.release(conn)
            assert server.accepted == 2
            c.close()

    run(main)


def test_connection_cut_mid_chunks_is_a_protocol_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await read_request(reader) is not None
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()

    async def main() -> None:
        async with serve(handler) as server:
            c = client()
            conn = await c.request("GET", server.url("/"))
            got = []
            with pytest.raises(http1.ProtocolError):
                async for piece in conn.chunks():
                    got.append(piece)
            assert got == [b"abc"]
            c.release(conn)
            c.close()

    run(main)


# --- 5. not HTTP at all ---


def test_garbage_answer_is_a_protocol_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await read_request(reader) is not None
        writer.write(b"hello\r\n\r\n")
        await writer.drain()
        await read_request(reader)  # hold the connection open: the client must give up by itself

    async def main() -> None:
        async with serve(handler) as server:
            c = client(max_connections=1)
            with pytest.raises(http1.ProtocolError, match="malformed"):
                await c.request("GET", server.url("/"))
            # the broken connection was closed and its slot returned
            with pytest.raises(http1.ProtocolError):
                await c.request("GET", server.url("/"))
            assert server.accepted == 2
            c.close()

    run(main)


# --- 6. read timeout ---


def test_read_timeout_when_the_server_never_answers() -> None:
    saw_eof = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await read_request(reader) is not None
        assert await reader.read() == b""  # silent until the client hangs up
        saw_eof.set()

    async def main() -> None:
        async with serve(handler) as server:
            c = client(read_timeout=0.2)
            start = time.monotonic()
            with pytest.raises(TimeoutError, match=r"0\.2 s"):
                await c.request("GET", server.url("/"))
            took = time.monotonic() - start
            assert 0.15 <= took < 1.0
            await saw_eof.wait()  # the timed-out connection was closed, not pooled
            assert not any(c.idle.values())
            c.close()

    run(main)


def test_per_request_read_timeout_overrides_the_client_default() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()

    async def main() -> None:
        async with serve(handler) as server:
            c = client(read_timeout=30.0)
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                await c.request("GET", server.url("/"), read_timeout=0.2)
            assert time.monotonic() - start < 1.0
            c.close()

    run(main)


# --- 7. connect error ---


def test_nothing_listening_is_a_connect_error() -> None:
    port = free_port()

    async def main() -> None:
        c = client(max_connections=1)
        for _ in range(2):  # twice: a failed connect gives its slot back
            with pytest.raises(http1.ConnectError, match=f"127.0.0.1:{port}"):
                await c.request("GET", f"http://127.0.0.1:{port}/")
        c.close()

    run(main)
    assert issubclass(http1.ConnectError, OSError)


# --- 8. an idle connection the server closed ---


def test_idle_connection_closed_by_server_is_not_reused() -> None:
    handler = Answering(ok(b"once"), close_after=True)  # keep-alive answer, then hang up

    async def main() -> None:
        async with serve(handler) as server:
            c = client(max_connections=1)
            first = await c.request("GET", server.url("/"))
            assert await first.read() == b"once"
            c.release(first)
            assert first.reusable  # pooled: the answer said nothing about closing
            # until the server's FIN reaches the pooled connection (the client has no event
            # for that to await; run() bounds the loop)
            while first.alive:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            second = await c.request("GET", server.url("/"))
            assert await second.read() == b"once"
            assert second is not first
            assert server.accepted == 2
            c.release(second)
            c.close()

    run(main)


# --- 9. releasing an unread response aborts it ---


def test_release_without_reading_closes_the_connection() -> None:
    saw_eof = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await read_request(reader) is not None
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\nstart of a long answer")
        await writer.drain()
        assert await reader.read() == b""
        saw_eof.set()

    async def main() -> None:
        async with serve(handler) as server:
            c = client(max_connections=1)
            conn = await c.request("GET", server.url("/"))
            assert conn.status == 200
            c.release(conn)
            await saw_eof.wait()
            assert not conn.alive
            assert not c.idle.get(conn.origin)
            c.close()

    run(main)


# --- 10. split_url ---


@pytest.mark.parametrize(
    ("url", "origin", "path", "authority"),
    [
        ("http://example.com", http1.Origin("http", "example.com", 80), "/", "example.com"),
        ("http://example.com/", http1.Origin("http", "example.com", 80), "/", "example.com"),
        ("https://example.com/v1", http1.Origin("https", "example.com", 443), "/v1", "example.com"),
        (
            "http://127.0.0.1:8000/v1/chat/completions",
            http1.Origin("http", "127.0.0.1", 8000),
            "/v1/chat/completions",
            "127.0.0.1:8000",
        ),
        (
            "https://h.example:8443/a/b?x=1&y=2",
            http1.Origin("https", "h.example", 8443),
            "/a/b?x=1&y=2",
            "h.example:8443",
        ),
        ("http://h:443/", http1.Origin("http", "h", 443), "/", "h:443"),
        ("https://h:80/", http1.Origin("https", "h", 80), "/", "h:80"),
        ("http://h?q=1", http1.Origin("http", "h", 80), "/?q=1", "h"),
        ("http://h/x#fragment", http1.Origin("http", "h", 80), "/x", "h"),
        ("HTTP://Host.Example/x", http1.Origin("http", "host.example", 80), "/x", "host.example"),
    ],
)
def test_split_url(url: str, origin: http1.Origin, path: str, authority: str) -> None:
    assert http1.split_url(url) == (origin, path)
    assert origin.authority == authority


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x", "example.com/x", "localhost:8000/x", "/v1/x", "http:///x", ""]
)
def test_split_url_rejects_non_http(url: str) -> None:
    with pytest.raises(ValueError):
        http1.split_url(url)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_origin_host_header() -> None:
    handler = Answering(ok(b"v6"))

    async def main() -> None:
        async with serve(handler, host="::1") as server:
            c = client()
            conn = await c.request("GET", server.url("/x"))
            assert await conn.read() == b"v6"
            c.release(conn)
            c.close()
        (request,) = handler.requests
        assert request.headers["host"] == f"[::1]:{server.port}"

    run(main)


# --- 11. the connection limit ---


def test_connection_limit_evicts_an_idle_connection_for_another_origin() -> None:
    a_saw_eof = asyncio.Event()

    async def handler_a(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await read_request(reader) is not None
        writer.write(ok(b"from a"))
        await writer.drain()
        assert await read_request(reader) is None  # evicted: closed by the client, no 2nd request
        a_saw_eof.set()

    handler_b = Answering(ok(b"from b"))

    async def main() -> None:
        async with serve(handler_a) as a, serve(handler_b) as b:
            c = client(max_connections=1)
            conn = await c.request("GET", a.url("/"))
            assert await conn.read() == b"from a"
            c.release(conn)
            assert conn.reusable and c.idle[conn.origin] == [conn]
            other = await c.request("GET", b.url("/"))  # every slot is held by A's idle connection
            assert await other.read() == b"from b"
            c.release(other)
            await a_saw_eof.wait()
            assert not conn.alive
            assert (a.accepted, b.accepted) == (1, 1)
            c.close()

    run(main)
