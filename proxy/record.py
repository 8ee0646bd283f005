"""`LogRecord`: what the proxy remembers about one request. Its own module so that the log
writer (`audit`), the metrics and the request path all import it and none imports another."""

from __future__ import annotations

import dataclasses
import operator
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class LogRecord:
    """What the proxy remembers about one request."""

    request_id: str
    time: float  # epoch seconds at request start
    route: str
    upstream_model: str
    template: str | None
    mode: str
    stream: bool
    status: int
    refusal: bool | None
    rule: str | None
    score: float | None
    latency_s: float
    ttft_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    prompt_sha256: str
    error: str | None = None
    prompt_text: str | None = None
    completion_text: str | None = None
    traceparent: str | None = None  # the client's W3C trace context, as sent upstream

    def to_dict(self) -> dict[str, Any]:
        return dict(zip(FIELDS, record_row(self), strict=True))


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LogRecord))
record_row = operator.attrgetter(*FIELDS)  # a record as a tuple of its fields, in column order
