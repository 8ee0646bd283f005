"""Errors the proxy answers with, all rendered as the OpenAI error envelope.

    ProxyError                      any error with an HTTP status and an OpenAI error type
    ├── BadRequest (400)            malformed JSON, schema errors, a policy that rejects input
    ├── Unauthorized (401)          missing or wrong API key
    ├── Forbidden (403)             a request the route's policy forbids (raw prompts on enforced routes)
    ├── NotFound (404)              unknown model / route
    ├── PayloadTooLarge (413)       body over the configured limit
    ├── UpstreamRejected (4xx)      the upstream refused the request (its status and message)
    └── UpstreamError (502)         the upstream failed or answered garbage
        ├── UpstreamUnavailable (503)  no upstream reachable, or the upstream said 503
        └── UpstreamTimeout (504)      the upstream did not answer in time

This module has no FastAPI import: pure code (rewrite, templates) raises these, and the app
renders them with one handler.
"""

from __future__ import annotations

from typing import Any


class ProxyError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers: dict[str, str] = {}  # sent with the error (an upstream's Retry-After)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


class BadRequest(ProxyError):
    status_code = 400
    error_type = "invalid_request_error"


class Unauthorized(ProxyError):
    status_code = 401
    error_type = "authentication_error"


class Forbidden(ProxyError):
    status_code = 403
    error_type = "permission_error"


class NotFound(ProxyError):
    status_code = 404
    error_type = "not_found_error"


class PayloadTooLarge(ProxyError):
    status_code = 413
    error_type = "invalid_request_error"


class UpstreamRejected(ProxyError):
    """The upstream answered 4xx: the client's request is at fault, so its status is kept."""

    error_type = "invalid_request_error"

    def __init__(self, status_code: int, message: str, **kwargs: str | None) -> None:
        super().__init__(message, **kwargs)
        self.status_code = status_code


class UpstreamError(ProxyError):
    status_code = 502
    error_type = "upstream_error"


class UpstreamStatus(UpstreamError):
    """The upstream answered an error status other than 4xx or 503 (the client gets a 502)."""


class UpstreamUnavailable(UpstreamError):
    status_code = 503


class UpstreamBusy(UpstreamUnavailable):
    """The upstream answered 503 (busy, or still loading): the client gets the 503."""


class UpstreamTimeout(UpstreamError):
    status_code = 504


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
