"""What differs between the generation endpoints once the upstream has answered 200: how the
proxy reads an answer for the detector and the log, and what it passes on to the client.

    ChatAnswer       /chat/completions and /completions (prompt mode converted to chat)
    ResponsesAnswer  /responses

The request path (`routes.forward`, `routes.relay`) is the same for all of them and calls
these hooks; no FastAPI import here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ptst.proxy import jsonfast
from ptst.proxy.convert import completion_to_chat
from ptst.proxy.errors import ProxyError, UpstreamError
from ptst.proxy.exchange import FINAL_EVENTS, Exchange
from ptst.proxy.schemas import StreamOptions
from ptst.proxy.sse import DONE, event


class Answer(Protocol):
    done: bool  # the upstream's stream reached its proper end

    def body(self, raw: bytes, data: dict[str, Any]) -> bytes:
        """A whole JSON answer: read it, return the bytes for the client."""
        ...

    def event(self, raw: bytes, payload: Any) -> bytes | None:
        """One upstream SSE event (`payload` decoded): read it, return what to pass on."""
        ...

    def failure(self, err: ProxyError) -> bytes:
        """What ends the client's stream when the upstream failed after the 200 went out."""
        ...


class ChatAnswer:
    """Chat chunks pass through unchanged (or converted from completions in prompt mode);
    the usage chunk the proxy asked for its log is dropped unless the client asked too."""

    def __init__(
        self,
        ex: Exchange,
        convert: Callable[[dict[str, Any]], dict[str, Any]] | None,
        want_usage: bool,
    ) -> None:
        self.ex, self.convert, self.want_usage = ex, convert, want_usage
        self.done = False

    @classmethod
    def for_request(
        cls,
        ex: Exchange,
        body: dict[str, Any],
        stream_options: StreamOptions | None,
        convert: Callable[[dict[str, Any]], dict[str, Any]] | None,
    ) -> ChatAnswer:
        """Also asks the upstream for usage on streams, which the log wants (`body`, in place)."""
        want_usage = bool(stream_options and stream_options.include_usage)
        if ex.stream:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return cls(ex, convert, want_usage)

    def body(self, raw: bytes, data: dict[str, Any]) -> bytes:
        if self.convert is not None:
            data = completion_to_chat(data)
            raw = jsonfast.dumps(data)
        self.ex.on_response(data)
        return raw

    def event(self, raw: bytes, payload: Any) -> bytes | None:
        if payload == "[DONE]":
            self.done = True
            return DONE
        if isinstance(payload, dict) and "choices" in payload:
            chat = self.convert(payload) if self.convert else payload
            self.ex.on_chunk(chat)
            if self.want_usage or chat.get("usage") is None:
                return event(chat) if self.convert else raw
            if chat["choices"]:  # usage the proxy asked for its log, not the client
                chat.pop("usage")
                return event(chat)
            return None
        if isinstance(payload, dict) and "error" in payload:
            self.ex.fail(502, str(payload["error"]))
        elif payload is None:
            return unreadable(raw)
        return raw

    def failure(self, err: ProxyError) -> bytes:
        return event(err.body()) + DONE


class ResponsesAnswer:
    """Responses events pass through unchanged as they arrive (named SSE events, no [DONE]);
    the detector reads the output text deltas, the log takes usage from the final event."""

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.done = False

    def body(self, raw: bytes, data: dict[str, Any]) -> bytes:
        self.ex.on_responses_object(data)
        return raw

    def event(self, raw: bytes, payload: Any) -> bytes | None:
        if isinstance(payload, dict):
            self.ex.on_event(payload)
            kind = payload.get("type")
            if kind in FINAL_EVENTS or kind == "error":
                self.done = True
            if kind in ("error", "response.failed") or "error" in payload:
                self.ex.fail(502, _event_error(payload))
        elif payload is None:
            return unreadable(raw)
        return raw

    def failure(self, err: ProxyError) -> bytes:
        return responses_error_event(err.body())


def responses_error_event(envelope: dict[str, Any]) -> bytes:
    """An `error` event in the Responses shape that also carries the OpenAI error envelope,
    so that the SDK raises `APIError` as it does for chat."""
    body = envelope["error"]
    payload = {
        "type": "error",
        "code": body["code"],
        "message": body["message"],
        "param": body["param"],
        **envelope,
    }
    return b"event: error\n" + event(payload)


def unreadable(raw: bytes) -> bytes | None:
    """An event the parser could not decode. If its data is not JSON, the stream ends with an
    error: the detector cannot read it, so it must not reach the client. A comment (a
    keep-alive) passes; an event of lines that are no SSE field is dropped: the client gets
    only what the proxy understood."""
    lines = raw.splitlines()
    if any(line.startswith(b"data:") for line in lines):
        raise UpstreamError(
            "upstream sent a stream event whose data is not JSON", code="upstream_bad_event"
        )
    return raw if all(not line or line.startswith(b":") for line in lines) else None


def _event_error(payload: dict[str, Any]) -> str:
    """The message of an upstream error event, a failed response, or an error envelope."""
    response = payload.get("response")
    error = payload.get("error") or (response.get("error") if isinstance(response, dict) else None)
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return str(error or payload.get("message") or payload.get("type"))
