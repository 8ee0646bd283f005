"""The proxy under sustained load (issue 11, item 7): 256 streaming clients at once for 60 s
through `ptst serve` (one worker) to the bench responder. No proxy errors, resident memory in
the second half within 10% of the first half's, and the refusal log holds exactly one record per
completed request, matched by the x-request-id each answer carried.

Marked `soak` (registered in pyproject.toml, part of the default run: `-m "not soak"` leaves it
out). The client is one aiohttp event loop; each answer streams 16 tokens 50 ms apart (the
responder's `slow` model), so 256 streams stay open at once at a request rate the two cores can
carry beside the proxy.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import pytest

from ptst.bench import procs
from tests.conftest import Proxy

pytestmark = pytest.mark.soak

CLIENTS = 256
SECONDS = 60.0
GROWTH_LIMIT = 1.10  # second half's resident memory over the first half's
SAMPLE_S = 1.0


@dataclass
class Tally:
    completed: list[str] = field(default_factory=list)  # request ids of whole, clean answers
    failures: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds in, bytes)

    def fail(self, kind: str, detail: str) -> None:
        self.failures[kind] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{kind}: {detail[:300]}")


def resident_bytes(pid: int) -> int:
    """RSS of the proxy and any processes it started."""
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


async def one_stream(session: aiohttp.ClientSession, url: str, n: int, tally: Tally) -> None:
    body = {
        "model": "soak",
        "messages": [{"role": "user", "content": f"question {n}"}],
        "stream": True,
    }
    try:
        async with session.post(url, json=body) as resp:
            raw = await resp.read()
            request_id = resp.headers.get("x-request-id")
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.fail("transport", repr(exc))
        return
    if resp.status != 200:
        tally.fail(f"status {resp.status}", raw.decode(errors="replace"))
        return
    if not raw.endswith(b"data: [DONE]\n\n") or b'"error"' in raw:
        tally.fail("stream", raw.decode(errors="replace")[-300:])
        return
    if not request_id:
        tally.fail("no x-request-id", "")
        return
    tally.completed.append(request_id)


async def client(
    session: aiohttp.ClientSession, url: str, index: int, stop_at: float, tally: Tally
) -> None:
    await asyncio.sleep(index * 0.004)  # a ramp of about a second, not one burst of 256
    n = index
    while time.monotonic() < stop_at:
        await one_stream(session, url, n, tally)
        n += CLIENTS


async def sample_memory(pid: int, began: float, stop_at: float, tally: Tally) -> None:
    while (now := time.monotonic()) < stop_at:
        tally.rss.append((now - began, resident_bytes(pid)))
        await asyncio.sleep(SAMPLE_S)


async def soak(proxy: Proxy) -> Tally:
    tally = Tally()
    url = proxy.base_url + "/chat/completions"
    connector = aiohttp.TCPConnector(limit=CLIENTS, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    began = time.monotonic()
    stop_at = began + SECONDS
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(
            sample_memory(proxy.server.pid, began, stop_at, tally),
            *(client(session, url, i, stop_at, tally) for i in range(CLIENTS)),
        )
    return tally


def jsonl_ids(path: Path) -> Counter[str]:
    if not path.exists():
        return Counter()
    return Counter(json.loads(line)["request_id"] for line in path.read_text().splitlines())


def test_256_streams_for_60_seconds(
    start_proxy: Callable[..., Proxy], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with procs.responder(tokens=16) as upstream:
        route = {"model": "soak", "upstream": upstream, "upstream_model": "slow"}
        proxy = start_proxy([{**route, "template": "chat:llama"}], log={"queue_size": 200_000})
        began, client_cpu = time.monotonic(), time.process_time()
        proxy_cpu = sum(psutil.Process(proxy.server.pid).cpu_times()[:2])
        tally = asyncio.run(soak(proxy))
        elapsed = time.monotonic() - began
        client_cpu = time.process_time() - client_cpu
        proxy_cpu = sum(psutil.Process(proxy.server.pid).cpu_times()[:2]) - proxy_cpu

    jsonl = Path(proxy.config["log"]["jsonl"])
    completed = Counter(tally.completed)
    deadline = time.monotonic() + 30
    while not set(completed) <= set(logged := jsonl_ids(jsonl)) and time.monotonic() < deadline:
        time.sleep(0.5)

    half = SECONDS / 2
    first = [rss for t, rss in tally.rss if t < half]
    second = [rss for t, rss in tally.rss if t >= half]
    growth = statistics.median(second) / statistics.median(first)
    report = {
        "seconds": round(elapsed, 1),
        "completed": len(tally.completed),
        "per_second": round(len(tally.completed) / SECONDS, 1),
        "failures": dict(tally.failures),
        "client_cpu_s": round(client_cpu, 1),
        "proxy_cpu_s": round(proxy_cpu, 1),
        "rss_mib_first_half_median": round(statistics.median(first) / 2**20, 1),
        "rss_mib_second_half_median": round(statistics.median(second) / 2**20, 1),
        "rss_mib_last": round(tally.rss[-1][1] / 2**20, 1),
        "rss_growth": round(growth, 4),
        "log_records": sum(logged.values()),
    }
    with capsys.disabled():
        print("\nsoak:", json.dumps(report))

    assert not tally.failures, (dict(tally.failures), tally.examples)
    assert len(tally.completed) >= CLIENTS, report  # every client finished at least one stream
    assert len(completed) == len(tally.completed), "two answers carried the same request id"
    assert growth < GROWTH_LIMIT, report
    assert set(logged) == set(completed), (
        f"{len(set(completed) - set(logged))} completed requests without a log record, "
        f"{len(set(logged) - set(completed))} records of no completed request"
    )
    assert all(n == 1 for n in logged.values()), [i for i, n in logged.items() if n > 1][:5]
    assert proxy.server.log_file is not None
    output = proxy.server.log_file.read_text().splitlines()
    assert not [line for line in output if "Traceback" in line or "ERROR" in line]
