"""Pure pieces of the stream path: the SSE parser and the prompt-mode conversion."""

from __future__ import annotations

import random

from ptst.proxy.convert import ChunkConverter, completion_to_chat
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
