"""Upstream credentials and tracing through a real `ptst serve`, with the official SDK as the
client: a route's key (api_key_env) reaches the upstream as a bearer token and nowhere else; the
client's x-request-id and W3C traceparent go upstream, come back (the id) and are logged; a
malformed id is replaced and a malformed traceparent dropped."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ptst.proxy.config import ConfigError, parse_settings
from tests.conftest import Proxy
from tests.servers import free_port

KEY = "sk-upstream-7c1d9e"
PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@contextlib.contextmanager
def recording_upstream() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A chat upstream on its own thread that answers "ok" and keeps every request's headers."""
    seen: list[dict[str, str]] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append({k.lower(): v for k, v in request.headers.items()})
        body = await request.json()
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    loop = asyncio.new_event_loop()
    port = free_port()
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/v1", seen
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def traced(
    start_proxy: Callable[..., Proxy],
) -> Iterator[tuple[Proxy, list[dict[str, str]]]]:
    with recording_upstream() as (url, seen), pytest.MonkeyPatch.context() as env:
        env.setenv("PTST_TEST_UPSTREAM_KEY", KEY)  # the proxy process inherits it
        proxy = start_proxy(
            [{"model": "m", "upstream": url, "api_key_env": "PTST_TEST_UPSTREAM_KEY"}]
        )
        yield proxy, seen


def ask(proxy: Proxy, headers: dict[str, str]) -> Any:
    client = proxy.client(default_headers=headers)
    return client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )


def test_key_id_and_trace_reach_the_upstream_and_the_log(
    traced: tuple[Proxy, list[dict[str, str]]],
) -> None:
    proxy, seen = traced
    raw = ask(proxy, {"x-request-id": "client-req-42", "traceparent": PARENT})
    assert raw.parse().choices[0].message.content == "ok"
    assert raw.headers["x-request-id"] == "client-req-42"
    upstream = seen[-1]
    assert upstream["authorization"] == f"Bearer {KEY}"
    assert upstream["x-request-id"] == "client-req-42"
    assert upstream["traceparent"] == PARENT
    (record,) = proxy.log_records("client-req-42")
    assert record["traceparent"] == PARENT and record["status"] == 200


@pytest.mark.parametrize(
    "rid, parent",
    [
        ("has spaces in it", "not-a-traceparent"),
        ("x" * 129, "00-00000000000000000000000000000000-00f067aa0ba902b7-01"),  # all-zero id
        ("id;drop table", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),  # version ff
    ],
)
def test_malformed_ids_are_replaced_and_traces_dropped(
    traced: tuple[Proxy, list[dict[str, str]]], rid: str, parent: str
) -> None:
    proxy, seen = traced
    raw = ask(proxy, {"x-request-id": rid, "traceparent": parent})
    own = raw.headers["x-request-id"]
    assert own.startswith("ptst-")
    assert seen[-1]["x-request-id"] == own and "traceparent" not in seen[-1]
    (record,) = proxy.log_records(own)
    assert record["traceparent"] is None


def test_the_upstream_key_is_nowhere_but_the_upstream(
    traced: tuple[Proxy, list[dict[str, str]]],
) -> None:
    proxy, _ = traced
    ask(proxy, {})
    proxy.client().models.list()
    for path in (Path(proxy.config["log"]["jsonl"]), Path(proxy.config["log"]["sqlite"])):
        assert KEY.encode() not in path.read_bytes()
    assert not any(KEY in line for line in list(proxy.server.lines))


def test_route_key_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    route = {"model": "m", "upstream": "http://127.0.0.1:1/v1"}
    monkeypatch.delenv("PTST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="PTST_NO_SUCH_KEY"):
        parse_settings({"routes": [{**route, "api_key_env": "PTST_NO_SUCH_KEY"}]})
    with pytest.raises(ConfigError, match="both api_key and api_key_env"):
        parse_settings({"routes": [{**route, "api_key": "a", "api_key_env": "HOME"}]})
    settings = parse_settings({"routes": [{**route, "api_key": KEY}]})
    assert KEY not in repr(settings) and KEY not in str(settings.routes[0])
    assert settings.routes[0].api_key is not None
    assert settings.routes[0].api_key.get_secret_value() == KEY
