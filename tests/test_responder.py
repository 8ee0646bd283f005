"""bench.responder: the fast fake upstream, checked with the official OpenAI SDK and httpx."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import openai
import pytest

from ptst.bench import procs
from ptst.bench.responder import REFUSAL, RETRY_AFTER, plan_answer, split_pieces, token_pieces

TOKENS = 16  # the responder_url fixture runs with the default --tokens
FULL = "tok " * (TOKENS - 1) + "tok"
MESSAGES: Any = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def client(responder_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=responder_url, api_key="none", max_retries=0, timeout=10)


def debug(url: str, what: str) -> Any:
    return httpx.get(url.removesuffix("/v1") + f"/debug/{what}", timeout=5).json()


# --- pure parts ----------------------------------------------------------------------------


def test_split_pieces_round_trips() -> None:
    for text in (REFUSAL, "one", "a  b", ' ["x", {"y": 1}] ', ""):
        assert "".join(split_pieces(text)) == text
    assert len(split_pieces(REFUSAL)) > 3


def test_plan_answer_caps_tokens_by_max_tokens() -> None:
    assert "".join(token_pieces(3)) == "tok tok tok"
    short = plan_answer("x", {"max_tokens": 3}, chat=True, default_tokens=16)
    assert len(short.pieces) == 3 and short.finish_reason == "length"
    capped = plan_answer("x", {"max_completion_tokens": 99}, chat=True, default_tokens=16)
    assert len(capped.pieces) == 16 and capped.finish_reason == "stop"
    echo = plan_answer("echo", {"prompt": "p q"}, chat=False, default_tokens=16)
    assert "".join(echo.pieces) == '"p q"' and echo.prompt_tokens == 2


# --- over HTTP -------------------------------------------------------------------------------


def test_chat_completion(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="bench", messages=MESSAGES)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.model == "bench"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == FULL
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None and out.usage.completion_tokens == TOKENS
    assert out.usage.prompt_tokens == 2
    assert out.usage.total_tokens == TOKENS + 2


def test_max_tokens_smaller_than_default(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="bench", messages=MESSAGES, max_tokens=3)
    assert out.choices[0].message.content == "tok tok tok"
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 3


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="bench", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(text_chunks) == TOKENS
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == FULL
    assert text_chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == TOKENS


def test_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="bench", messages=MESSAGES, stream=True))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_raw_stream_ends_with_done(responder_url: str) -> None:
    body = {"model": "bench", "messages": MESSAGES, "stream": True, "max_tokens": 2}
    resp = httpx.post(responder_url + "/chat/completions", json=body, timeout=5)
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [e for e in resp.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_completions(client: openai.OpenAI) -> None:
    out = client.completions.create(model="bench", prompt="say it", max_tokens=5)
    assert out.object == "text_completion" and out.choices[0].text == "tok tok tok tok tok"
    assert out.usage is not None and out.usage.completion_tokens == 5
    chunks = list(
        client.completions.create(
            model="bench",
            prompt="say it",
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "tok tok tok tok"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_refuse_streams_in_several_chunks(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="refuse", messages=MESSAGES, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) > 3 and "".join(pieces) == REFUSAL


def test_echo_returns_the_messages(client: openai.OpenAI) -> None:
    messages: Any = [
        {"role": "system", "content": "be safe"},
        {"role": "user", "content": "hi"},
    ]
    out = client.chat.completions.create(model="echo", messages=messages)
    assert json.loads(out.choices[0].message.content or "") == messages
    done = client.completions.create(model="echo", prompt="[INST] hi [/INST]")
    assert json.loads(done.choices[0].text) == "[INST] hi [/INST]"


@pytest.mark.parametrize(
    ("model", "error"),
    [
        ("error-400", openai.BadRequestError),
        ("error-429", openai.RateLimitError),
        ("error-500", openai.InternalServerError),
    ],
)
def test_errors_use_the_openai_envelope(
    client: openai.OpenAI, model: str, error: type[openai.APIStatusError]
) -> None:
    with pytest.raises(error) as info:
        client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
    body = info.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == model.split("-")[1]


def test_hang_counts_the_disconnect(responder_url: str) -> None:
    before = debug(responder_url, "stats")["disconnected"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            responder_url + "/chat/completions",
            json={"model": "hang", "messages": MESSAGES},
            timeout=httpx.Timeout(5.0, read=0.3),
        )
    deadline = time.monotonic() + 3
    while debug(responder_url, "stats")["disconnected"] == before:
        assert time.monotonic() < deadline, "the disconnect was not counted"
        time.sleep(0.05)


def test_drop_mid_stream_cuts_the_connection(responder_url: str) -> None:
    body = {"model": "drop-mid-stream", "messages": MESSAGES, "stream": True}
    received: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", responder_url + "/chat/completions", json=body, timeout=5) as resp,
    ):
        for line in resp.iter_lines():
            if line:
                received.append(line)
    assert len(received) == 2 and all(r.startswith("data: {") for r in received)
    body["stream"] = False
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(responder_url + "/chat/completions", json=body, timeout=5)


def test_garbage(responder_url: str) -> None:
    url = responder_url + "/chat/completions"
    plain = httpx.post(url, json={"model": "garbage", "messages": MESSAGES}, timeout=5)
    assert plain.status_code == 200
    with pytest.raises(ValueError):
        plain.json()
    stream = httpx.post(url, json={"model": "garbage", "messages": [], "stream": True}, timeout=5)
    assert stream.status_code == 200 and "data:" not in stream.text


def test_retry_after_on_429_and_503(responder_url: str) -> None:
    url = responder_url + "/chat/completions"
    for model, status in (("error-429", 429), ("error-503", 503), ("error-502", 502)):
        resp = httpx.post(url, json={"model": model, "messages": MESSAGES}, timeout=5)
        assert resp.status_code == status
        assert resp.headers.get("retry-after") == RETRY_AFTER.get(status)
        assert resp.json()["error"]["code"] == str(status)


@pytest.mark.parametrize("stream", [False, True])
def test_gzip_encodes_the_normal_answer(responder_url: str, stream: bool) -> None:
    url = responder_url + "/chat/completions"
    body = {"messages": MESSAGES, "stream": stream, "seed": 1}
    plain = httpx.post(url, json={**body, "model": "bench"}, timeout=5)
    with httpx.stream("POST", url, json={**body, "model": "gzip"}, timeout=5) as resp:
        assert resp.headers["content-encoding"] == "gzip"
        wire = resp.read()  # httpx decodes the gzip
        assert resp.num_bytes_downloaded < len(wire)  # what crossed the wire was compressed
    same = re.compile(rb'"(id|created|model)":("[^"]*"|\d+)')
    assert same.sub(b"", wire) == same.sub(b"", plain.content)


@pytest.mark.parametrize("stream", [False, True])
def test_hangs_after_the_head_and_mid_answer(responder_url: str, stream: bool) -> None:
    """hang-body sends the 200 and nothing more; hang-mid-stream the first events (or half the
    body) and then nothing; both hold the connection until the client leaves."""
    url = responder_url + "/chat/completions"
    for model, some in (("hang-body", False), ("hang-mid-stream", True)):
        before = debug(responder_url, "stats")["disconnected"]
        body = {"model": model, "messages": MESSAGES, "stream": stream}
        got = b""
        timeout = httpx.Timeout(5.0, read=0.3)
        with httpx.stream("POST", url, json=body, timeout=timeout) as resp:
            assert resp.status_code == 200
            with pytest.raises(httpx.ReadTimeout):
                for piece in resp.iter_raw():
                    got += piece
        assert bool(got) == some, got
        if some and stream:
            assert got.count(b"data: {") == 2
        deadline = time.monotonic() + 3
        while debug(responder_url, "stats")["disconnected"] == before:
            assert time.monotonic() < deadline, "the disconnect was not counted"
            time.sleep(0.05)


def test_bad_json(responder_url: str) -> None:
    url = responder_url + "/chat/completions"
    plain = httpx.post(url, json={"model": "bad-json", "messages": MESSAGES}, timeout=5)
    assert plain.status_code == 200 and plain.text.startswith('{"id"')
    with pytest.raises(ValueError):
        plain.json()
    body = {"model": "bad-json", "messages": MESSAGES, "stream": True}
    stream = httpx.post(url, json=body, timeout=5)
    data = [ln[6:] for ln in stream.text.split("\n") if ln.startswith("data: ")]
    undecodable = []
    for i, item in enumerate(data[:-1]):
        try:
            json.loads(item)
        except ValueError:
            undecodable.append(i)
    assert undecodable == [2] and data[-1] == "[DONE]"


def test_fault_option_answers_every_request_that_way() -> None:
    with procs.responder(tokens=4, fault="error-503") as url:
        resp = httpx.post(
            url + "/chat/completions", json={"model": "bench", "messages": MESSAGES}, timeout=5
        )
        assert resp.status_code == 503
        assert debug(url, "stats")["by_model"] == {"error-503": 1}


def test_slow_paces_chunks_and_counts_cancelled_streams(responder_url: str) -> None:
    body = {"model": "slow", "messages": MESSAGES, "stream": True, "max_tokens": 4}
    url = responder_url + "/chat/completions"
    start = time.perf_counter()
    resp = httpx.post(url, json=body, timeout=5)
    assert time.perf_counter() - start >= 0.14  # 3 pauses of 50 ms between 4 tokens
    assert resp.text.endswith("data: [DONE]\n\n")

    before = debug(responder_url, "stats")["disconnected"]
    body["max_tokens"] = 100
    with httpx.stream("POST", url, json=body, timeout=5) as stream:
        lines = stream.iter_lines()
        next(lines)
    deadline = time.monotonic() + 3
    while debug(responder_url, "stats")["disconnected"] == before:
        assert time.monotonic() < deadline, "the cancelled stream was not counted"
        time.sleep(0.05)


def test_models_health_and_debug(responder_url: str, client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"bench", "echo", "hang", "slow"} <= ids
    assert httpx.get(responder_url.removesuffix("/v1") + "/health", timeout=5).status_code == 200
    marker = {"role": "user", "content": f"marker {time.time()}"}
    client.chat.completions.create(model="bench", messages=[marker], max_tokens=1)
    recent = debug(responder_url, "requests")
    assert recent[-1]["messages"] == [marker] and recent[-1]["max_tokens"] == 1
    assert len(recent) <= 100
    stats = debug(responder_url, "stats")
    assert stats["requests"] >= stats["completed"] >= 1 and stats["by_model"]["bench"] >= 1


def test_bad_json_is_a_400(responder_url: str) -> None:
    resp = httpx.post(responder_url + "/chat/completions", content=b"{nope", timeout=5)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
