"""Server-sent events: split a byte stream into events, and write events. The one parser the
proxy and the bench share.

Lines end in `\\n`, `\\r\\n` or a lone `\\r`, split anywhere across reads (a `\\r` at the end of
a read waits for the next byte, which may be its `\\n`); an empty line ends an event. `finish()`
(or `events()` over a whole stream) ends the stream: a final `\\r` counts as a line end, and an event cut off without its empty line
is dropped.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from typing import Any

from ptst.proxy import jsonfast

DONE = b"data: [DONE]\n\n"
_EOL = re.compile(rb"\r\n|\r|\n")


class SSEParser:
    """Incremental parser: feed() bytes, get back the complete events they finish.

    Each event is (raw_bytes, payload): raw_bytes exactly as received (its lines and the empty
    line that ends it), payload the decoded JSON of its data field, the string "[DONE]", or None
    for events without data (comments, keep-alives) or undecodable data.
    """

    def __init__(self) -> None:
        self._buf = b""  # the unfinished event: its complete lines, then a partial line
        self._scanned = 0  # where the partial line starts in _buf
        self._data: list[bytes] = []  # the unfinished event's data lines

    def feed(self, chunk: bytes) -> list[tuple[bytes, Any]]:
        return self._parse(self._buf + chunk, final=False)

    def finish(self) -> list[tuple[bytes, Any]]:
        """The stream ended: the events a trailing `\\r` completes."""
        return self._parse(self._buf, final=True)

    @property
    def pending(self) -> bytes:
        return self._buf

    def _parse(self, buf: bytes, final: bool) -> list[tuple[bytes, Any]]:
        events: list[tuple[bytes, Any]] = []
        start, pos = 0, self._scanned  # start: the unfinished event's first byte
        for line_end, next_line in _line_ends(buf, pos, final):
            line, empty = buf[pos:line_end], line_end == pos
            if not empty and line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            elif empty and pos > start:  # an empty line ends a non-empty event
                events.append((buf[start:next_line], _payload(self._data)))
                self._data, start = [], next_line
            elif empty:  # a stray empty line between events
                start = next_line
            pos = next_line
        self._buf, self._scanned = buf[start:], pos - start
        return events


def _line_ends(buf: bytes, pos: int, final: bool) -> Iterator[tuple[int, int]]:
    """(end of line, start of the next) for each complete line of buf from pos. A CR that ends
    buf is complete only when `final` (else it may be the first half of CR LF)."""
    if b"\r" not in buf:  # the common case, LF only: no regex
        while (end := buf.find(b"\n", pos)) >= 0:
            yield end, end + 1
            pos = end + 1
        return
    for eol in _EOL.finditer(buf, pos):
        if eol.end() == len(buf) and eol.group() == b"\r" and not final:
            return
        yield eol.start(), eol.end()


async def events(chunks: AsyncIterable[bytes]) -> AsyncIterator[tuple[bytes, Any]]:
    """The events of a whole stream of byte chunks, as `SSEParser` cuts them."""
    parser = SSEParser()
    async for chunk in chunks:
        for item in parser.feed(chunk):
            yield item
    for item in parser.finish():
        yield item


def _payload(lines: list[bytes]) -> Any:
    if not lines:
        return None
    data = b"\n".join(lines)
    if data == b"[DONE]":
        return "[DONE]"
    try:
        return jsonfast.loads(data)
    except (ValueError, RecursionError):
        return None


def event(payload: Any) -> bytes:
    return b"data: " + jsonfast.dumps(payload) + b"\n\n"
