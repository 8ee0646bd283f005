"""Server-sent events: split a byte stream into events, and write events."""

from __future__ import annotations

from typing import Any

from ptst.proxy import jsonfast

DONE = b"data: [DONE]\n\n"


class SSEParser:
    """Incremental parser: feed() bytes, get back the complete events they finish.

    Each event is (raw_bytes, payload): payload is the decoded JSON of its data field, the string
    "[DONE]", or None for events without data (comments, keep-alives) or undecodable data.
    """

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[tuple[bytes, Any]]:
        self._buf += chunk.replace(b"\r\n", b"\n")
        events: list[tuple[bytes, Any]] = []
        while True:
            end = self._buf.find(b"\n\n")
            if end < 0:
                return events
            raw, self._buf = self._buf[: end + 2], self._buf[end + 2 :]
            events.append((raw, _payload(raw)))

    @property
    def pending(self) -> bytes:
        return self._buf


def _payload(raw: bytes) -> Any:
    data = b"\n".join(
        line[5:].lstrip(b" ") for line in raw.split(b"\n") if line.startswith(b"data:")
    )
    if not data:
        return None
    if data == b"[DONE]":
        return "[DONE]"
    try:
        return jsonfast.loads(data)
    except ValueError:
        return None


def event(payload: Any) -> bytes:
    return b"data: " + jsonfast.dumps(payload) + b"\n\n"
