"""What the proxy shows, to whom, and how it stops: /metrics and /admin/* behind the API keys
(with a flag that opens /metrics alone), keys in no log line, record or error message, CORS off
unless origins are listed, loopback by default, and SIGTERM: no new connections, streams in
flight finish up to the deadline or end with an error event and [DONE], log records flushed."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from ptst.bench import procs
from ptst.commands import serve
from ptst.engine import up
from ptst.proxy.config import ServerSettings
from ptst.proxy.drain import Drain, DrainMiddleware
from tests.conftest import Proxy, responder_routes
from tests.servers import run_dir_of, worker_pids

KEY = "sk-exposure-4f1c9a2e"
WRONG = "sk-wrong-77b2e0d1"
ORIGIN = "https://app.example.com"


def root(proxy: Proxy) -> str:
    return proxy.base_url.removesuffix("/v1")


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(start_proxy: Callable[..., Proxy], responder: str) -> Proxy:
    """API keys set, everything else default."""
    return start_proxy(responder_routes(responder), api_keys=[KEY])


@pytest.fixture(scope="module")
def scrapeable(start_proxy: Callable[..., Proxy], responder: str) -> Proxy:
    """API keys set, /metrics opened for scrapers, one browser origin allowed."""
    server = {"metrics_public": True, "cors_allow_origins": [ORIGIN]}
    return start_proxy(responder_routes(responder), api_keys=[KEY], server=server)


def test_metrics_and_admin_need_a_key(keyed: Proxy) -> None:
    with httpx.Client(base_url=root(keyed), timeout=10) as client:
        for headers in ({}, bearer(WRONG), {"authorization": KEY}):
            for method, path in (("GET", "/metrics"), ("POST", "/admin/reload")):
                reply = client.request(method, path, headers=headers)
                assert reply.status_code == 401, (method, path, headers)
                assert reply.json()["error"]["code"] == "invalid_api_key"
        metrics = client.get("/metrics", headers=bearer(KEY))
        assert metrics.status_code == 200
        assert "ptst_requests_total" in metrics.text
        assert client.post("/admin/reload", headers=bearer(KEY)).status_code == 200
        assert client.get("/health/live").status_code == 200  # probes need no key


def test_metrics_public_opens_metrics_alone(scrapeable: Proxy) -> None:
    with httpx.Client(base_url=root(scrapeable), timeout=10) as client:
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert "ptst_requests_total" in metrics.text
        assert client.post("/admin/reload").status_code == 401
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers=bearer(KEY)).status_code == 200


def preflight(client: httpx.Client, origin: str) -> httpx.Response:
    return client.options(
        "/v1/chat/completions",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type, x-stainless-os",
        },
    )


def test_cors_is_off_by_default(keyed: Proxy) -> None:
    with httpx.Client(base_url=root(keyed), timeout=10) as client:
        reply = preflight(client, ORIGIN)
        assert reply.status_code >= 400
        assert "access-control-allow-origin" not in reply.headers
        plain = client.get("/v1/models", headers={"origin": ORIGIN, **bearer(KEY)})
        assert plain.status_code == 200
        assert not any(h.startswith("access-control-") for h in plain.headers)


def test_cors_answers_the_listed_origins_only(scrapeable: Proxy) -> None:
    with httpx.Client(base_url=root(scrapeable), timeout=10) as client:
        allowed = preflight(client, ORIGIN)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "x-stainless-os" in allowed.headers["access-control-allow-headers"].lower()
        other = preflight(client, "https://evil.example.net")
        assert other.status_code == 400
        assert "access-control-allow-origin" not in other.headers

        body = {"model": "fake-echo", "messages": [{"role": "user", "content": "hi"}]}
        reply = client.post(
            "/v1/chat/completions", json=body, headers={"origin": ORIGIN, **bearer(KEY)}
        )
        assert reply.status_code == 200
        assert reply.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in reply.headers["access-control-expose-headers"]


def test_keys_never_reach_a_log_a_record_or_an_answer(keyed: Proxy) -> None:
    chat = {"model": "fake-echo", "messages": [{"role": "user", "content": "hi"}]}
    answers: list[str] = []
    ids: list[str] = []
    with httpx.Client(base_url=keyed.base_url, timeout=30) as client:
        for stream in (False, True):
            reply = client.post(
                "/chat/completions", json={**chat, "stream": stream}, headers=bearer(KEY)
            )
            assert reply.status_code == 200
            ids.append(reply.headers["x-request-id"])
            answers.append(reply.text)
        for headers, body in (
            (bearer(WRONG), chat),
            ({"authorization": f"Basic {KEY}"}, chat),
            (bearer(KEY), {**chat, "model": "no-such-model"}),
            (bearer(KEY), {"model": "fake-echo", "messages": "not a list"}),
        ):
            reply = client.post("/chat/completions", json=body, headers=headers)
            assert 400 <= reply.status_code < 500
            answers.append(reply.text)
        # a key in bytes that are not ASCII: a 401, not a 500 from the comparison
        odd = client.post(
            "/chat/completions", json=chat, headers={b"authorization": b"Bearer \xe9t\xe9"}
        )
        assert odd.status_code == 401
    for rid in ids:
        assert len(keyed.log_records(rid)) == 1

    assert not any(KEY in text or WRONG in text for text in answers)
    log = keyed.server.log_file
    assert log is not None
    written = [log.read_bytes()] + [
        Path(keyed.config["log"][sink]).read_bytes() for sink in ("jsonl", "sqlite")
    ]
    assert written[0]  # the server log was really read (start-up lines at least)
    for data in written:
        assert KEY.encode() not in data
        assert WRONG.encode() not in data


def test_loopback_by_default() -> None:
    assert ServerSettings().host == "127.0.0.1"
    serve_parser = argparse.ArgumentParser()
    serve.add_arguments(serve_parser)
    assert serve_parser.parse_args(["--config", "x.yaml"]).host is None  # the config's host
    up_parser = argparse.ArgumentParser()
    up.add_arguments(up_parser)
    assert up_parser.parse_args([]).proxy_host == "127.0.0.1"


# SIGTERM


@pytest.fixture(scope="module")
def slow_responder() -> Iterator[str]:
    """`slow` streams one token every 50 ms, up to 400 of them (20 s)."""
    with procs.responder(tokens=400) as url:
        yield url


class Stream(threading.Thread):
    """A streamed chat request of `tokens` tokens from `slow`, read to its end."""

    def __init__(self, proxy: Proxy, tokens: int) -> None:
        super().__init__(daemon=True)
        self.proxy, self.tokens = proxy, tokens
        self.first = threading.Event()
        self.body = b""
        self.request_id = ""
        self.error: BaseException | None = None
        self.ended = 0.0

    def run(self) -> None:
        body = {
            "model": "fake-slow",
            "stream": True,
            "max_tokens": self.tokens,
            "messages": [{"role": "user", "content": "hi"}],
        }
        url = f"{self.proxy.base_url}/chat/completions"
        try:
            with httpx.Client(timeout=60) as client, client.stream("POST", url, json=body) as r:
                self.request_id = r.headers["x-request-id"]
                for chunk in r.iter_bytes():
                    self.body += chunk
                    self.first.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended = time.monotonic()
            self.first.set()

    def events(self) -> list[str]:
        return [e.removeprefix("data: ") for e in self.body.decode().split("\n\n") if e]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_streams_then_flushes_the_log(
    start_proxy: Callable[..., Proxy], slow_responder: str, workers: int
) -> None:
    deadline_s = 3.0
    proxy = start_proxy(
        responder_routes(slow_responder),
        workers=workers,
        server={"shutdown_timeout_s": deadline_s},
    )
    port = proxy.config["server"]["port"]
    run_dirs = {d for pid in worker_pids(proxy.server.pid) if (d := run_dir_of(pid))}
    assert len(run_dirs) == (1 if workers > 1 else 0)

    short, long = Stream(proxy, 20), Stream(proxy, 400)  # 1 s and 20 s of tokens
    for s in (short, long):
        s.start()
    for s in (short, long):
        assert s.first.wait(30) and s.error is None, s.error
    proxy.server.signal(signal.SIGTERM)
    sent = time.monotonic()

    limit = time.monotonic() + 2
    while not refused(port):  # the listening socket closes at once
        assert time.monotonic() < limit, "still accepting connections after SIGTERM"
        time.sleep(0.05)
    assert long.is_alive()  # while the stream in flight goes on

    for s in (short, long):
        s.join(timeout=30)
        assert not s.is_alive() and s.error is None, s.error
    assert short.events()[-1] == "[DONE]"
    assert '"finish_reason":"length"' in short.events()[-2]
    assert short.ended - sent < deadline_s
    *_, error, done = long.events()
    assert done == "[DONE]"
    assert json.loads(error)["error"]["code"] == "shutting_down"
    assert deadline_s - 0.5 < long.ended - sent < deadline_s + 4

    assert proxy.server.proc.wait(timeout=30) is not None
    lines = Path(proxy.config["log"]["jsonl"]).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    by_id = {r["request_id"]: r for r in records}
    assert len(records) == 2 and set(by_id) == {short.request_id, long.request_id}
    assert by_id[short.request_id]["status"] == 200
    assert by_id[short.request_id]["completion_tokens"] == 20
    assert by_id[long.request_id]["status"] == 503  # cut by the deadline, not by its client
    assert by_id[long.request_id]["error"] == "the proxy is shutting down"
    assert not any(Path(d).exists() for d in run_dirs)  # the run folder went with the parent


# The deadline's last word, in process (no server): each shape of answer it can cut.

Message = MutableMapping[str, Any]
SSE = [(b"content-type", b"text/event-stream")]


async def never() -> Message:
    """An ASGI receive whose client neither sends nor leaves."""
    await asyncio.sleep(30)
    return {"type": "http.disconnect"}


def drained(path: str, chunks: int | None, deadline_s: float = 0.1) -> list[Message]:
    """What a client gets from an app that sends `chunks` SSE chunks (None: nothing at all)
    and then hangs, when shutdown starts at once with this deadline."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if chunks is not None:
            await send({"type": "http.response.start", "status": 200, "headers": SSE})
            for _ in range(chunks):
                await send(
                    {"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True}
                )
        await asyncio.sleep(30)

    async def main() -> list[Message]:
        drain = Drain(deadline_s)
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        task = asyncio.create_task(
            DrainMiddleware(app, drain)({"type": "http", "path": path}, never, send)
        )
        await asyncio.sleep(0.01)
        drain.begin()
        await asyncio.wait_for(task, 5)
        assert not drain.active
        return sent

    return asyncio.run(main())


def test_deadline_answers_a_request_not_yet_answered_with_503() -> None:
    start, body = drained("/v1/chat/completions", None)
    assert start["status"] == 503
    assert json.loads(body["body"])["error"]["code"] == "shutting_down"
    assert not body.get("more_body", False)


def test_deadline_ends_a_chat_stream_with_an_error_event_and_done() -> None:
    *relayed, last = drained("/v1/chat/completions", 2)
    assert [m["type"] for m in relayed] == ["http.response.start", *["http.response.body"] * 2]
    error, done = last["body"].decode().split("\n\n")[:2]
    assert json.loads(error.removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert done == "data: [DONE]"
    assert last["more_body"] is False


def test_deadline_ends_a_responses_stream_with_an_error_event() -> None:
    *_, last = drained("/v1/responses", 1)
    event, data = last["body"].decode().strip().split("\n")
    assert event == "event: error"
    assert json.loads(data.removeprefix("data: "))["code"] == "shutting_down"
    assert b"[DONE]" not in last["body"]  # the Responses API has no [DONE]


def test_a_request_that_ends_before_the_deadline_is_untouched() -> None:
    async def main() -> list[Message]:
        drain = Drain(5.0)
        sent: list[Message] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": SSE})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

        async def send(message: Message) -> None:
            sent.append(message)

        drain.begin()
        await DrainMiddleware(app, drain)(
            {"type": "http", "path": "/v1/chat/completions"}, never, send
        )
        return sent

    sent = asyncio.run(main())
    assert [m.get("body") for m in sent] == [None, b"data: [DONE]\n\n"]
