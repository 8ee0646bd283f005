"""Calls to the upstream OpenAI-compatible servers, on aiohttp: pooled keep-alive connections,
replica choice (fewest outstanding requests; a replica that just failed goes last for a cooldown),
a request not yet streaming retried on the next replica, per-route timeouts by phase, and the
mapping of transport failures to proxy errors.

aiohttp handles what a hand-written client got wrong: interim 1xx answers, compressed bodies
(the proxy asks for `identity` and still decodes gzip or deflate), header size caps (128 fields
of at most 8 KiB), HTTP(S)_PROXY and NO_PROXY from the environment, per-host limits.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from ptst.proxy import jsonfast
from ptst.proxy.config import Route, ServerSettings, Timeouts
from ptst.proxy.errors import (
    ProxyError,
    UpstreamBusy,
    UpstreamError,
    UpstreamRejected,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)

# uvicorn (vLLM's server) closes a keep-alive connection after 5 s idle; a request written onto
# one as it closes would fail, so connections idle this long are closed instead of reused.
KEEPALIVE_S = 4.0
BASE_HEADERS = {
    "content-type": "application/json",
    "accept-encoding": "identity",
    "user-agent": "ptst-proxy",
}
# Upstream statuses after which the request goes to the next replica: this one is overloaded or
# broken, and it did not generate anything for the request.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
PASSED_HEADERS = ("retry-after",)  # upstream response headers that reach the client on an error


class Upstreams:
    """Must be created inside the running event loop (the app's lifespan)."""

    def __init__(
        self, settings: ServerSettings, on_failover: Callable[[str, str], None] | None = None
    ) -> None:
        # called with (route, error kind) when a replica fails and the next one gets the request
        self.on_failover = on_failover or (lambda route, kind: None)
        connector = aiohttp.TCPConnector(
            limit=settings.max_connections,
            limit_per_host=settings.max_connections_per_host,
            keepalive_timeout=KEEPALIVE_S,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # shared by every client: keep no cookies
            skip_auto_headers=("user-agent",),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        self.cooldown_s = settings.cooldown_s
        self.outstanding: collections.Counter[str] = collections.Counter()
        self.cooling: dict[str, float] = {}  # replica -> monotonic time its cooldown ends
        # HTTP(S)_PROXY / NO_PROXY, read once per upstream: aiohttp's trust_env reads the
        # environment and ~/.netrc on every request, which cost ~0.9 ms each here.
        self._proxies = urllib.request.getproxies_environment()
        self._proxy_of: dict[str, str | None] = {}

    async def aclose(self) -> None:
        await self.session.close()

    def order(self, route: Route) -> list[str]:
        """The route's replicas to try, best first: not cooling down, then fewest outstanding."""
        if len(route.upstream) == 1:
            return route.upstream
        now = time.monotonic()
        return sorted(
            route.upstream,
            key=lambda base: (self.cooling.get(base, 0.0) > now, self.outstanding[base]),
        )

    def proxy_for(self, base: str) -> str | None:
        """The forward proxy the environment names for this upstream, if any."""
        if base not in self._proxy_of:
            parts = urlsplit(base)
            bypass = urllib.request.proxy_bypass(parts.netloc)  # NO_PROXY
            self._proxy_of[base] = None if bypass else self._proxies.get(parts.scheme)
        return self._proxy_of[base]

    async def open(
        self, route: Route, path: str, body: dict[str, Any], headers: Mapping[str, str]
    ) -> Call:
        """Send a POST and return the open response once its status is known to be 200.

        A replica that cannot be reached or answers 429/5xx is put in cooldown and the request
        goes to the next one (nothing was generated for it yet); the last failure is what the
        client sees. The caller must `await call.close()`.
        """
        content = jsonfast.dumps(body)
        sent = {**BASE_HEADERS, **headers}
        if route.api_key is not None:
            sent["authorization"] = "Bearer " + route.api_key.get_secret_value()
        limits = route.timeouts or Timeouts()
        failure: ProxyError | None = None
        for base in self.order(route):
            if failure is not None:  # counted here; the last failure is the caller's to count
                self.on_failover(route.model, error_kind(failure))
            try:
                return await self._send(base, path, content, sent, limits)
            except _Retry as retry:
                failure = retry.error
                if self.cooldown_s:
                    self.cooling[base] = time.monotonic() + self.cooldown_s
        assert failure is not None  # a route has at least one replica
        raise failure

    async def _send(
        self, base: str, path: str, content: bytes, headers: dict[str, str], limits: Timeouts
    ) -> Call:
        self.outstanding[base] += 1
        timeout = client_timeout(limits.total, limits.pool, limits.connect)
        try:
            async with asyncio.timeout(limits.first_byte):
                resp = await self.session.post(
                    base + path,
                    data=content,
                    headers=headers,
                    timeout=timeout,
                    proxy=self.proxy_for(base),
                    allow_redirects=False,  # a 3xx is an error: only configured hosts get requests
                )
        except BaseException as exc:
            self.outstanding[base] -= 1
            if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
                raise _Retry(transport_error(exc, base)) from exc  # nothing was sent
            if isinstance(exc, Exception):
                raise transport_error(exc, base) from exc
            raise
        call = Call(self, base, resp, limits.between_chunks)
        if resp.status == 200:
            return call
        error = await call.read_error()
        if resp.status in RETRY_STATUSES:
            raise _Retry(error)
        raise error

    async def get_health(self, base: str) -> bool:
        url = base.removesuffix("/v1") + "/health"
        try:
            async with self.session.get(
                url,
                timeout=aiohttp.ClientTimeout(total=2.0),
                proxy=self.proxy_for(base),
                allow_redirects=False,  # a redirect is not ready: only configured hosts are asked
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (OSError, aiohttp.ClientError, TimeoutError):
            return False


@functools.lru_cache(maxsize=64)
def client_timeout(total: float | None, pool: float, connect: float) -> aiohttp.ClientTimeout:
    """aiohttp's timeouts for one request: its `connect` is the pool wait and the connection
    together; first byte and between chunks are the proxy's own (`asyncio.timeout`)."""
    return aiohttp.ClientTimeout(total=total, connect=pool + connect, sock_connect=connect)


class _Retry(Exception):
    """This replica failed before generating anything: try the next one."""

    def __init__(self, error: ProxyError) -> None:
        self.error = error


class Call:
    """One upstream response in flight."""

    def __init__(
        self, owner: Upstreams, base: str, resp: aiohttp.ClientResponse, between_chunks: float
    ) -> None:
        self.owner = owner
        self.base = base
        self.resp = resp
        self.between_chunks = between_chunks
        self._closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, in whatever pieces the network delivers."""
        content = self.resp.content
        while True:
            async with asyncio.timeout(self.between_chunks):
                piece = await content.readany()
            if not piece:
                return
            yield piece

    async def read(self) -> bytes:
        """The whole body, which must arrive within `between_chunks` of its head (an answer
        that is not streamed is sent whole once generated)."""
        try:
            async with asyncio.timeout(self.between_chunks):
                return await self.resp.read()
        except Exception as exc:
            raise transport_error(exc, self.base) from exc

    async def read_json(self) -> tuple[bytes, dict[str, Any]]:
        """The whole body, raw and decoded (the raw bytes can go to the client unchanged)."""
        raw = await self.read()
        try:
            data = jsonfast.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise UpstreamError(
                f"upstream {self.base} answered 200 with a body that is not a JSON object",
                code="upstream_error",
            )
        return raw, data

    async def close(self) -> None:
        """Return the connection to the pool when the body was read, else drop it (which
        aborts the generation upstream)."""
        if not self._closed:
            self._closed = True
            self.owner.outstanding[self.base] -= 1
            if self.resp.content.is_eof():
                self.resp.release()
            else:
                self.resp.close()

    async def read_error(self) -> ProxyError:
        """The proxy error for a non-200 answer, with the upstream's message and Retry-After."""
        status = self.resp.status
        try:
            raw = await self.read()
        except ProxyError:
            raw = b""
        finally:
            await self.close()
        if 300 <= status < 400:
            where = self.resp.headers.get("location", "nowhere")
            message = f"upstream {self.base} redirected to {where}: configure the final URL"
        else:
            message = _upstream_message(raw) or f"upstream answered HTTP {status}"
        headers = {k: v for k in PASSED_HEADERS if (v := self.resp.headers.get(k)) is not None}
        error: ProxyError
        if status == 404:
            message = f"upstream {self.base} does not serve this route's model: {message}"
            error = UpstreamStatus(f"upstream error (HTTP 404): {message}", code="upstream_error")
        elif 400 <= status < 500:
            error = UpstreamRejected(status, message, code="upstream_rejected")
        elif status == 503:
            error = UpstreamBusy(
                f"upstream {self.base} is unavailable (HTTP 503): {message}", code="upstream_busy"
            )
        else:
            error = UpstreamStatus(
                f"upstream error (HTTP {status}): {message}", code="upstream_error"
            )
        error.headers = headers
        return error


def transport_error(exc: BaseException, base: str) -> ProxyError:
    """Map a failure while talking to an upstream to the proxy's error."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(
            f"cannot connect to upstream {base}: {exc.os_error}", code="upstream_unavailable"
        )
    if isinstance(exc, TimeoutError):  # aiohttp's own timeouts are TimeoutErrors too
        what = "connecting" if isinstance(exc, aiohttp.ConnectionTimeoutError) else "answering"
        return UpstreamTimeout(f"upstream {base} timed out {what}", code="upstream_timeout")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return UpstreamError(
            f"upstream {base} closed the connection mid-answer: {exc}", code="upstream_error"
        )
    return UpstreamError(
        f"upstream {base} failed: {type(exc).__name__}: {exc}", code="upstream_error"
    )


def error_kind(exc: BaseException) -> str:
    """The label for the upstream-errors metric."""
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, UpstreamRejected | UpstreamStatus | UpstreamBusy):  # an answered status
        return "status"
    if isinstance(exc, UpstreamUnavailable):
        return "connect"
    return "protocol"


def _upstream_message(raw: bytes) -> str | None:
    try:
        data = jsonfast.loads(raw)
    except ValueError:
        text = raw.decode("utf-8", "replace").strip()
        return text[:500] or None
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(data.get("message"), str):
            return str(data["message"])
    return None
