"""A raw HTTP/1.1 load generator for measuring a proxy's own cost on loopback.

One pre-encoded request per target, sent over keep-alive connections built on asyncio
protocols (uvloop); the response parser reads only the status line and Content-Length, and no
coroutine or future is made per request. Two ways to drive it:

- closed loop: every connection sends its next request as soon as the last one answered; the
  request rate is whatever the target sustains (its capacity), and latency includes the
  queueing that saturation causes;
- open loop: requests arrive at a fixed mean rate (Poisson, seeded) whatever the target does;
  an arrival takes an idle connection or waits for one, and its latency counts from its
  scheduled arrival, so a target that falls behind is charged for the wait (no coordinated
  omission).
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import httpx

from ptst.bench import stats

_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)")


def http_request(base_url: str, path: str, body: dict[str, Any]) -> bytes:
    """A complete HTTP/1.1 keep-alive POST with a JSON body, encoded once and reused."""
    url = httpx.URL(base_url.rstrip("/") + path)
    payload = json.dumps(body).encode()
    head = (
        f"POST {url.raw_path.decode()} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


@dataclass
class Tally:
    """Latencies (s) and failures recorded by the connections of one target in one round."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


Free = Callable[["_Conn", float], None]


class _Conn(asyncio.Protocol):
    """One keep-alive connection: send, read the whole response, tell the round it is free."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.sent_at = 0.0
        self.tally = Tally()
        self.on_free: Free | None = None
        self.alive = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same API
        self.transport = cast(asyncio.Transport, transport)
        self.alive = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        if self.on_free is not None:  # a request was in flight
            self.tally.errors += 1
            self._free(time.perf_counter())

    def send(self, at: float, tally: Tally, on_free: Free) -> None:
        """Send the request; its latency counts from `at` (now, or its scheduled arrival)."""
        assert self.transport is not None
        self.sent_at, self.tally, self.on_free, self.buffer = at, tally, on_free, b""
        self.transport.write(self.request)

    def _free(self, now: float) -> None:
        on_free, self.on_free = self.on_free, None
        if on_free is not None:
            on_free(self, now)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.buffer = buf
            return
        match = _LENGTH.search(buf[:end].lower())
        if match is None:  # chunked or close-delimited: not what these servers send
            if b"\r\n0\r\n\r\n" not in buf:
                self.buffer = buf
                return
            total = buf.index(b"\r\n0\r\n\r\n") + 7
        else:
            total = end + 4 + int(match.group(1))
            if len(buf) < total:
                self.buffer = buf
                return
        now = time.perf_counter()
        status = int(buf[9:12])
        tally = self.tally
        if status == 200:
            tally.latencies.append(now - self.sent_at)
        else:
            tally.errors += 1
        tally.statuses[status] = tally.statuses.get(status, 0) + 1
        self.buffer = buf[total:]
        self._free(now)


@dataclass
class Round:
    """What one round measured: the tally, its wall time and the generator's own CPU time."""

    tally: Tally
    seconds: float
    cpu: float


class Blaster:
    """A pool of raw connections to one target, reused across rounds."""

    def __init__(self, base_url: str, request: bytes, connections: int) -> None:
        url = httpx.URL(base_url)
        self.host, self.port = url.host, url.port or 80
        self.request = request
        self.conns: list[_Conn] = []
        self.connections = connections

    async def _ensure(self) -> None:
        loop = asyncio.get_running_loop()
        self.conns = [c for c in self.conns if c.alive]
        while len(self.conns) < self.connections:
            _, conn = await loop.create_connection(
                lambda: _Conn(self.request), self.host, self.port
            )
            self.conns.append(conn)

    async def round(
        self,
        seconds: float,
        connections: int | None = None,
        rate: float | None = None,
        seed: int = 0,
    ) -> Round:
        """One round of `seconds` on `connections` connections: a closed loop, or with `rate`
        an open loop of Poisson arrivals at that mean rate (requests/s)."""
        await self._ensure()
        conns = self.conns[: connections or self.connections]
        tally = Tally()
        cpu0, t0 = time.process_time(), time.perf_counter()
        if rate is None:
            await _closed(conns, tally, t0 + seconds)
        else:
            await _open(conns, tally, t0, seconds, rate, random.Random(seed))
        return Round(tally, time.perf_counter() - t0, time.process_time() - cpu0)

    def close(self) -> None:
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.close()


async def _closed(conns: Sequence[_Conn], tally: Tally, deadline: float) -> None:
    done = asyncio.get_running_loop().create_future()
    busy = len(conns)

    def free(conn: _Conn, now: float) -> None:
        nonlocal busy
        if now < deadline and conn.alive:
            conn.send(now, tally, free)
            return
        busy -= 1
        if busy == 0 and not done.done():
            done.set_result(None)

    now = time.perf_counter()
    for conn in conns:
        conn.send(now, tally, free)
    await done


async def _open(
    conns: Sequence[_Conn],
    tally: Tally,
    t0: float,
    seconds: float,
    rate: float,
    rng: random.Random,
) -> None:
    loop = asyncio.get_running_loop()
    # first in, first out: every connection stays in use, so none sits idle long enough for
    # the server to close it (uvicorn: 5 s) just as a request goes out on it
    idle = collections.deque(conns)
    backlog: collections.deque[float] = collections.deque()  # scheduled times waiting
    in_flight = 0
    drained = loop.create_future()
    arriving = True

    def free(conn: _Conn, now: float) -> None:
        nonlocal in_flight
        if backlog and conn.alive:
            conn.send(backlog.popleft(), tally, free)
            return
        in_flight -= 1
        if conn.alive:
            idle.append(conn)
        if not arriving and in_flight == 0 and not drained.done():
            drained.set_result(None)

    at, end = t0, t0 + seconds
    while True:
        at += rng.expovariate(rate)
        if at >= end:
            break
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        while idle and not idle[0].alive:
            idle.popleft()
        if idle:
            in_flight += 1
            idle.popleft().send(at, tally, free)
        else:
            backlog.append(at)
    arriving = False
    if in_flight:
        async with asyncio.timeout(seconds + 60):
            await drained
    tally.errors += len(backlog)  # no live connection was left to send them on


@dataclass
class Side:
    """What one target accumulated over its rounds."""

    latencies: list[float] = field(default_factory=list)
    count: int = 0
    errors: int = 0
    seconds: float = 0.0
    cpu: float = 0.0

    def add(self, measured: Round) -> None:
        self.latencies += measured.tally.latencies
        self.count += len(measured.tally.latencies)
        self.errors += measured.tally.errors
        self.seconds += measured.seconds
        self.cpu += measured.cpu

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.count,
            "errors": self.errors,
            "seconds": self.seconds,
            "requests_per_s": self.count / self.seconds if self.seconds else 0.0,
            "latency_ms": stats.summarize(self.latencies, 1000),
            "generator_cpu_share": self.cpu / self.seconds if self.seconds else 0.0,
        }


async def interleave(
    blasters: Sequence[Blaster],
    rounds: int,
    seconds: float,
    connections: int | None = None,
    rate: float | None = None,
) -> list[Side]:
    """Alternate rounds over the targets in ABBA order; one Side per target. In open-loop
    rounds every target gets the same arrival schedule (one seed per round)."""
    sides = [Side() for _ in blasters]
    for r in range(rounds):
        order = list(range(len(blasters)))
        if r % 2:
            order.reverse()
        for t in order:
            sides[t].add(await blasters[t].round(seconds, connections, rate, seed=r))
    return sides
