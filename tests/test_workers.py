"""`ptst serve --workers 2` in front of the fast responder: one /metrics scrape sums what every
worker served, a reload reaches every worker, a killed worker's in-flight requests leave the
sums. Each request goes on a fresh connection, so the kernel hands it to either worker; a
request id's 12 hex digits after `ptst-` name the worker that made it (proxy/exchange.py)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import Proxy, total
from tests.servers import worker_pids

KEYS = {"route", "template", "upstream_model", "status"}


def route(responder: str, model: str = "m", upstream_model: str = "bench") -> dict[str, Any]:
    return {
        "model": model,
        "upstream": responder,
        "upstream_model": upstream_model,
        "template": "chat:llama",
    }


def root(proxy: Proxy) -> str:
    return proxy.base_url.removesuffix("/v1")


def worker_of(request_id: str) -> str:
    assert request_id.startswith("ptst-"), request_id
    return request_id[5:17]


def chat(proxy: Proxy, model: str, stream: bool = False) -> httpx.Response:
    """One chat request on a connection of its own (so either worker may take it)."""
    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=30) as client:
        return client.post(f"{proxy.base_url}/chat/completions", json=body)


def served_by_both(proxy: Proxy, model: str, timeout: float = 15.0) -> Counter[str]:
    """Requests for `model` until both workers have answered one with 200 (or the timeout)."""
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + timeout
    while len(seen) < 2 and time.monotonic() < deadline:
        reply = chat(proxy, model)
        if reply.status_code == 200:
            seen[worker_of(reply.headers["x-request-id"])] += 1
        else:
            time.sleep(0.05)
    return seen


def test_one_scrape_sums_every_worker(start_proxy: Callable[..., Proxy], responder: str) -> None:
    proxy = start_proxy([route(responder)], workers=2)
    seen: Counter[str] = Counter()
    sent = 0
    while sent < 200 and (sent < 30 or min(seen.values()) < 5 or len(seen) < 2):
        reply = chat(proxy, "m", stream=sent % 2 == 1)
        assert reply.status_code == 200, reply.text
        seen[worker_of(reply.headers["x-request-id"])] += 1
        sent += 1
    assert len(seen) == 2, f"one worker took all {sent} requests: {seen}"

    # whichever worker answers a scrape, it counts every worker's requests, exactly
    for _ in range(6):
        scrape = proxy.scrape()  # every total below comes from this one scrape
        requests = [s for s in scrape if s.name == "ptst_requests_total"]
        assert {frozenset(s.labels) for s in requests} == {frozenset(KEYS)}
        assert total(scrape, "ptst_requests_total", route="m", status="200") == sent
        assert total(scrape, "ptst_request_latency_seconds_count", route="m") == sent
        assert total(scrape, "ptst_completion_tokens_total", route="m") == 8 * sent
        assert total(scrape, "ptst_requests_in_flight", route="m") == 0


def test_a_reload_reaches_every_worker(start_proxy: Callable[..., Proxy], responder: str) -> None:
    # the file watch is off: only the explicit reload can tell a worker about the change
    proxy = start_proxy([route(responder)], workers=2, reload_interval_s=0)
    assert len(served_by_both(proxy, "m")) == 2

    proxy.write_config({**proxy.config, "routes": [route(responder), route(responder, "added")]})
    time.sleep(1.5)  # longer than a watcher's tick
    assert {chat(proxy, "added").status_code for _ in range(6)} == {404}

    with httpx.Client(timeout=10) as client:
        reply = client.post(f"{root(proxy)}/admin/reload")  # reaches one worker
    assert reply.status_code == 200, reply.text
    assert "added" in reply.json()["routes"]
    assert len(served_by_both(proxy, "added")) == 2
    assert total(proxy.scrape(), "ptst_template_reloads_total", result="ok") == 2

    # SIGHUP to the parent (what `kill -HUP` on the service's main process does)
    proxy.write_config({**proxy.config, "routes": [route(responder), route(responder, "again")]})
    proxy.server.signal(signal.SIGHUP)
    assert len(served_by_both(proxy, "again")) == 2
    assert total(proxy.scrape(), "ptst_template_reloads_total", result="ok") == 4
    assert proxy.server.poll() is None  # the parent handled it: no restart, no exit


def test_a_killed_workers_requests_leave_the_in_flight_sum(
    start_proxy: Callable[..., Proxy], responder: str
) -> None:
    proxy = start_proxy([route(responder), route(responder, "hang", "hang")], workers=2)
    for _ in range(6):
        assert chat(proxy, "m").status_code == 200

    failures: list[BaseException] = []

    def hang() -> None:
        try:
            chat(proxy, "hang", stream=True)
        except httpx.HTTPError as exc:  # the worker died under it
            failures.append(exc)

    threads = [threading.Thread(target=hang) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while total(proxy.scrape(), "ptst_requests_in_flight", route="hang") < 2:
        assert time.monotonic() < deadline, "the hanging requests never showed in flight"
        time.sleep(0.1)

    pids = worker_pids(proxy.server.pid)
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=30)
    assert len(failures) == 2

    deadline = time.monotonic() + 60  # uvicorn starts two new workers
    while len(set(worker_pids(proxy.server.pid)) - set(pids)) < 2 or not started(proxy, 4):
        assert time.monotonic() < deadline, proxy.server.tail()
        time.sleep(0.2)
    scrape = proxy.scrape()
    assert total(scrape, "ptst_requests_in_flight", route="hang") == 0
    assert total(scrape, "ptst_requests_total", route="m") == 6  # dead workers' counts stay


def started(proxy: Proxy, n: int) -> bool:
    return sum("startup complete" in line for line in list(proxy.server.lines)) >= n
