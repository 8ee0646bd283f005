"""Calls to the upstream OpenAI-compatible servers: pooled keep-alive connections
(proxy/http1.py), replica choice (least outstanding requests), and the mapping of transport
failures to proxy errors.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

from ptst.proxy import http1, jsonfast
from ptst.proxy.config import Route, ServerSettings
from ptst.proxy.errors import (
    ProxyError,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)

JSON_HEADERS = {"content-type": "application/json", "user-agent": "ptst-proxy"}


class Upstreams:
    """Must be created inside the running event loop (the app's lifespan)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.client = http1.Client(
            settings.max_connections, settings.connect_timeout, settings.read_timeout
        )
        self.outstanding: collections.Counter[str] = collections.Counter()

    async def aclose(self) -> None:
        self.client.close()

    async def open(self, route: Route, path: str, body: dict[str, Any]) -> Call:
        """Send a POST and return the open response once its status is known to be 200.

        Replicas are tried in order of fewest outstanding requests; a replica that refuses the
        connection is skipped (nothing was sent). The caller must `await call.close()`.
        """
        content = jsonfast.dumps(body)
        last: Exception | None = None
        for base in sorted(route.upstream, key=self.outstanding.__getitem__):
            self.outstanding[base] += 1
            try:
                conn = await self.client.request("POST", base + path, content, JSON_HEADERS)
            except http1.ConnectError as exc:
                self.outstanding[base] -= 1
                last = exc
                continue
            except Exception as exc:
                self.outstanding[base] -= 1
                raise transport_error(exc, base) from exc
            except BaseException:
                self.outstanding[base] -= 1
                raise
            call = Call(self, base, conn)
            if conn.status != 200:
                await call.close_with_error()
            return call
        raise UpstreamUnavailable(
            f"no upstream for model {route.model!r} accepted a connection ({last})",
            code="upstream_unavailable",
        )

    async def get_health(self, base: str) -> bool:
        url = base.removesuffix("/v1") + "/health"
        try:
            async with asyncio.timeout(2.0):
                conn = await self.client.request("GET", url, read_timeout=2.0)
                try:
                    await conn.read()
                finally:
                    self.client.release(conn)
        except (OSError, http1.ProtocolError):  # TimeoutError is an OSError
            return False
        return conn.status == 200


class Call:
    """One upstream response in flight."""

    def __init__(self, owner: Upstreams, base: str, conn: http1.Connection) -> None:
        self.owner = owner
        self.base = base
        self.conn = conn
        self._closed = False

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, in whatever pieces the network delivers."""
        return self.conn.chunks()

    async def read_json(self) -> tuple[bytes, dict[str, Any]]:
        """The whole body, raw and decoded (the raw bytes can go to the client unchanged)."""
        try:
            raw = await self.conn.read()
        except Exception as exc:
            raise transport_error(exc, self.base) from exc
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
            self.owner.client.release(self.conn)

    async def close_with_error(self) -> None:
        status = self.conn.status
        try:
            raw = await self.conn.read()
        except (OSError, http1.ProtocolError):
            raw = b""
        finally:
            await self.close()
        message = _upstream_message(raw) or f"upstream answered HTTP {status}"
        if 400 <= status < 500 and status != 404:
            raise UpstreamRejected(status, message, code="upstream_rejected")
        if status == 404:
            message = f"upstream {self.base} does not serve this route's model: {message}"
        raise UpstreamError(f"upstream error (HTTP {status}): {message}", code="upstream_error")


def transport_error(exc: Exception, base: str) -> ProxyError:
    """Map a failure while talking to an upstream to the proxy's error."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"upstream {base} timed out: {exc}", code="upstream_timeout")
    if isinstance(exc, http1.ConnectError):
        return UpstreamUnavailable(
            f"cannot connect to upstream {base}", code="upstream_unavailable"
        )
    return UpstreamError(
        f"upstream {base} failed: {type(exc).__name__}: {exc}", code="upstream_error"
    )


def error_kind(exc: BaseException) -> str:
    """The label for the upstream-errors metric."""
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, UpstreamUnavailable):
        return "connect"
    if isinstance(exc, UpstreamRejected):
        return "status"
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
