"""What the proxy saw of one request: timings, the answer's text as it streamed, usage, the
refusal verdict, and the log record written when it ends."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ptst.proxy.config import Route
from ptst.proxy.record import LogRecord
from ptst.proxy.refusal import RefusalDetector

# Responses API stream events that end a response; each carries the whole response and its usage.
FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})

# Request ids: a random prefix per process and a counter (uuid4 per request costs a syscall).
_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNTER = itertools.count(1)
# A client's own x-request-id is kept when it is a plain token; W3C trace context, version 00.
CLIENT_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
TRACEPARENT = re.compile(r"[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")


def new_request_id() -> str:
    return f"ptst-{_ID_PREFIX}{next(_ID_COUNTER):x}"


def client_ids(headers: Mapping[str, str]) -> tuple[str, str | None]:
    """The request id (the client's `x-request-id` when it is a plain token, else a new one)
    and the client's W3C `traceparent` when well formed: both go upstream and into the log."""
    rid = headers.get("x-request-id")
    if rid is None or not CLIENT_ID.fullmatch(rid):
        rid = new_request_id()
    parent = headers.get("traceparent")
    if parent is not None and (not TRACEPARENT.fullmatch(parent) or parent.startswith("ff")):
        parent = None
    return rid, parent


@dataclass
class Exchange:
    route: Route
    mode: str
    stream: bool
    messages: Any  # what the client asked: chat messages, or a raw prompt
    keep_text: bool
    request_id: str = field(default_factory=new_request_id)
    traceparent: str | None = None
    started: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    ttft: float | None = None
    status: int = 200
    error: str | None = None
    usage: dict[str, Any] | None = None
    detector: RefusalDetector = field(default_factory=RefusalDetector)
    _text: list[str] = field(default_factory=list)

    def on_text(self, text: str) -> None:
        if not text:
            return
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.t0
        self.detector.feed(text)
        if self.keep_text:
            self._text.append(text)

    def on_chunk(self, chunk: dict[str, Any]) -> None:
        """A streamed chat or completion chunk (the first choice's text is what is judged)."""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) == 0:
                delta = choice.get("delta") or {}
                self.on_text(delta.get("content") or choice.get("text") or "")

    def on_response(self, resp: dict[str, Any]) -> None:
        """A whole chat or completion response."""
        self.usage = resp.get("usage")
        choice = (resp.get("choices") or [{}])[0]
        content = (choice.get("message") or {}).get("content", choice.get("text"))
        self.on_text(content if isinstance(content, str) else "")

    def on_event(self, event: dict[str, Any]) -> None:
        """A streamed Responses API event: output text deltas are judged, the final event
        brings the usage."""
        kind = event.get("type")
        if kind == "response.output_text.delta":
            delta = event.get("delta")
            self.on_text(delta if isinstance(delta, str) else "")
        elif kind in FINAL_EVENTS:
            self.usage = responses_usage(event.get("response"))

    def on_responses_object(self, resp: dict[str, Any]) -> None:
        """A whole Responses API response."""
        self.usage = responses_usage(resp)
        self.on_text(output_text(resp))

    def fail(self, status: int, message: str) -> None:
        self.status, self.error = status, message

    def record(self) -> LogRecord:
        verdict = self.detector.verdict() if self.status == 200 else None
        usage = self.usage or {}
        return LogRecord(
            request_id=self.request_id,
            time=self.started,
            route=self.route.model,
            upstream_model=self.route.upstream_name,
            template=self.route.template,
            mode=self.mode,
            stream=self.stream,
            status=self.status,
            refusal=verdict.refusal if verdict else None,
            rule=verdict.rule if verdict else None,
            score=verdict.score if verdict else None,
            latency_s=time.perf_counter() - self.t0,
            ttft_s=self.ttft,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            prompt_sha256=prompt_sha256(self.messages),
            error=self.error,
            prompt_text=json.dumps(self.messages, ensure_ascii=False) if self.keep_text else None,
            completion_text="".join(self._text) if self.keep_text else None,
            traceparent=self.traceparent,
        )

    def upstream_headers(self) -> dict[str, str]:
        """What the upstream hears of this request's identity."""
        if self.traceparent is None:
            return {"x-request-id": self.request_id}
        return {"x-request-id": self.request_id, "traceparent": self.traceparent}


def prompt_sha256(messages: Any) -> str:
    canonical = json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def output_text(resp: dict[str, Any]) -> str:
    """The text of a Responses API response: its messages' output_text parts, in order."""
    texts = []
    for item in resp.get("output") or []:
        if isinstance(item, dict) and item.get("type") == "message":
            for part in item.get("content") or []:
                if isinstance(part, dict) and part.get("type") == "output_text":
                    texts.append(part.get("text") or "")
    return "".join(texts)


def responses_usage(resp: Any) -> dict[str, Any] | None:
    """A Responses usage (input/output tokens) under the chat names the log record reads."""
    usage = resp.get("usage") if isinstance(resp, dict) else None
    if not isinstance(usage, dict):
        return None
    return {
        "prompt_tokens": usage.get("input_tokens"),
        "completion_tokens": usage.get("output_tokens"),
        "total_tokens": usage.get("total_tokens"),
    }
