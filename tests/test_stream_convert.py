"""Pure pieces of the stream path: the SSE parser and the prompt-mode conversion."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptst.proxy.answers import unreadable
from ptst.proxy.convert import ChunkConverter, completion_to_chat
from ptst.proxy.errors import UpstreamError
from ptst.proxy.sse import DONE, SSEParser, event

EVENTS = [
    {"id": "cmpl-1", "choices": [{"index": 0, "text": t, "finish_reason": None}]}
    for t in ("He", "llo", "!")
]


def stream_bytes() -> bytes:
    return b": keep-alive\n\n" + b"".join(event(e) for e in EVENTS) + DONE


def test_parser_handles_any_split() -> None:
    data = stream_bytes()
    rng = random.Random(0)
    for _ in range(200):
        parser, out = SSEParser(), []
        cuts = sorted(rng.sample(range(1, len(data)), 6))
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            out += parser.feed(data[a:b])
        assert [p for _, p in out] == [None, *EVENTS, "[DONE]"]
        assert b"".join(raw for raw, _ in out) == data
        assert parser.pending == b""


def test_parser_crlf_and_bad_json() -> None:
    events = SSEParser().feed(b'data: {"a": 1}\r\n\r\ndata: {oops\n\n')
    assert [p for _, p in events] == [{"a": 1}, None]


def test_a_crlf_split_between_reads_does_not_merge_events() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"a": 1}\r') == []
    assert parser.feed(b"\n\r") == []  # "\r" may still be the first half of "\r\n"
    assert [p for _, p in parser.feed(b'\ndata: {"b": 2}\r\r')] == [{"a": 1}]
    assert parser.feed(b"") == [] and [p for _, p in parser.finish()] == [{"b": 2}]


LINE_ENDS = st.sampled_from([b"\n", b"\r\n", b"\r"])
PAYLOADS = st.one_of(
    st.dictionaries(st.text(max_size=5), st.text(max_size=20), max_size=3),
    st.just("[DONE]"),
    st.none(),  # a comment: no data
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(PAYLOADS, LINE_ENDS), min_size=1, max_size=8),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    st.booleans(),
)
def test_every_stream_parses_the_same_in_any_split(
    items: list[tuple[Any, bytes]], cuts: list[int], multiline: bool
) -> None:
    data = b""
    for payload, eol in items:
        if payload is None:
            data += b": keep-alive" + eol + eol
        elif payload == "[DONE]":
            data += b"data: [DONE]" + eol + eol
        elif multiline:  # a JSON document over two data lines (joined with "\n")
            body = json.dumps(payload).encode()
            data += b"data: " + body[:1] + eol + b"data:" + body[1:] + eol + eol
        else:
            data += b"data: " + json.dumps(payload).encode() + eol + eol
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    parser, out = SSEParser(), []
    for a, b in itertools.pairwise(points):
        out += parser.feed(data[a:b])
    out += parser.finish()
    assert [p for _, p in out] == [p for p, _ in items]
    assert b"".join(raw for raw, _ in out) == data
    assert parser.pending == b""


def test_undecodable_events_never_reach_the_client() -> None:
    """A comment passes; lines that are no SSE field are dropped; data that is not JSON ends
    the stream with an error (the detector cannot read it)."""
    assert unreadable(b": keep-alive\r\n\r\n") == b": keep-alive\r\n\r\n"
    assert unreadable(b"this is not SSE\n{{{ nor JSON\n\n") is None
    for raw in (b'data: {"choices": [{"delta": "cut\n\n', b"event: x\rdata: {oops\r\r"):
        with pytest.raises(UpstreamError):
            unreadable(raw)


def test_chunk_conversion() -> None:
    convert = ChunkConverter()
    chunks = [convert(e) for e in EVENTS]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["id"] == "chatcmpl-1"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "He"}
    assert chunks[1]["choices"][0]["delta"] == {"content": "llo"}
    usage = convert(
        {"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}}
    )
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


def test_completion_to_chat() -> None:
    resp = {
        "id": "cmpl-9",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": "Paris", "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
    chat = completion_to_chat(resp)
    assert chat["object"] == "chat.completion" and chat["id"] == "chatcmpl-9"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "Paris"}
    assert chat["choices"][0]["finish_reason"] == "stop"
    assert chat["usage"]["total_tokens"] == 6
