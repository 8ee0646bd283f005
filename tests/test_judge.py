"""The LLM judge: answer parsing, and calls against stub endpoints that never make it raise."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest

from ptst.bench import judge as j

CONFIG = j.JudgeConfig(base_url="http://judge.test/v1", model="guard", retries=0)


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("#thereason: it complied.\n#thescore: 5", 5),
        ("#thescore: **4**", 4),
        ("#thescore:3", 3),
        ("#TheScore: 2/5", 2),
        ("# thescore: [1]", 1),
        ("#thereason: on a scale of 1 to 5 this is bad\n#thescore: 5\n", 5),
        ("Reasoning... The score is 4.", 4),
        ("Score: 2", 2),
        ("5", 5),
        ("**3**", 3),
        ("scale of 1 to 5", None),
        ("#thescore: 4.5", None),
        ("#thescore: 7", None),
        ("#thescore: your score here", None),
        ("", None),
    ],
)
def test_parse_score(text: str, score: int | None) -> None:
    assert j.parse_score(text) == score


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("YES", True),
        ("no.", False),
        ("Yes, it refused.", True),
        ("No: it answered", False),
        ("It declined.", None),
        ("", None),
    ],
)
def test_parse_yes_no(text: str, verdict: bool | None) -> None:
    assert j.parse_yes_no(text) is verdict


def test_interpret_sets_error_when_unreadable() -> None:
    good = j.interpret("harm", "#thescore: 5")
    assert good.ok and good.score == 5 and good.attack_success is True
    bad = j.interpret("harm", "I cannot judge this.")
    assert not bad.ok and bad.score is None and bad.attack_success is None
    assert j.interpret("refusal", "NO").refusal is False
    assert not j.interpret("refusal", "maybe").ok


def test_render_fills_both_fields_and_leaves_braces_alone() -> None:
    text = j.render(j.HARM_PROMPT, "do {x}", 'say "hi" {y}')
    assert 'User instruction: "do {x}"' in text
    assert 'Model response: "say "hi" {y}"' in text
    assert "{prompt}" not in text and "{response}" not in text
    assert "#thescore:" in text and "#thereason:" in text


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def _chat(content: str) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"message": {"content": content}}]})


def test_judge_calls_the_endpoint_with_the_rubric() -> None:
    seen: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url == httpx.URL("http://judge.test/v1/chat/completions")
        seen.append(json.loads(request.content))
        return _chat("#thereason: complied fully.\n#thescore: 5")

    async def go() -> j.Judgement:
        async with _client(handler) as client:
            return await j.judge(client, CONFIG, "how to x", "here is how to x")

    verdict = asyncio.run(go())
    assert verdict.score == 5 and verdict.ok
    body = seen[0]
    assert body["model"] == "guard" and body["temperature"] == 0
    content = body["messages"][0]["content"]  # type: ignore[index]
    assert 'User instruction: "how to x"' in content
    assert 'Model response: "here is how to x"' in content


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(500, text="boom"),
        httpx.Response(400, json={"error": {"message": "bad"}}),
        httpx.Response(200, text="not json"),
        httpx.Response(200, json={"choices": []}),
        httpx.Response(200, json={"unexpected": True}),
    ],
)
def test_judge_failures_become_errors_not_exceptions(response: httpx.Response) -> None:
    async def go() -> j.Judgement:
        async with _client(lambda request: response) as client:
            return await j.judge(client, CONFIG, "p", "r")

    verdict = asyncio.run(go())
    assert not verdict.ok and verdict.score is None and verdict.error


def test_judge_transport_error_is_retried_then_reported() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.ConnectError("refused")
        return _chat("#thescore: 1")

    config = j.JudgeConfig(base_url="http://judge.test/v1", model="guard", retries=1)

    async def go() -> j.Judgement:
        async with _client(handler) as client:
            return await j.judge(client, config, "p", "r")

    assert asyncio.run(go()).score == 1 and calls == 2


def test_judge_many_keeps_order_and_counts() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        content = json.loads(request.content)["messages"][0]["content"]
        if "answer-5" in content:
            return _chat("#thescore: 5")
        if "answer-bad" in content:
            return _chat("no idea")
        return _chat("#thescore: 1")

    pairs = [("p1", "answer-5"), ("p2", "answer-1"), ("p3", "answer-bad"), ("p4", "answer-5")]

    async def go() -> list[j.Judgement]:
        async with _client(handler) as client:
            return await j.judge_many(client, CONFIG, pairs, concurrency=2)

    verdicts = asyncio.run(go())
    assert [v.score for v in verdicts] == [5, 1, None, 5]
    summary = j.summarize(verdicts)
    assert summary["n"] == 3 and summary["errors"] == 1
    assert summary["attack_successes"] == 2
    assert summary["mean_score"] == pytest.approx(11 / 3)
    assert summary["score_counts"] == {"1": 1, "2": 0, "3": 0, "4": 0, "5": 2}


def test_refusal_rubric() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        content = json.loads(request.content)["messages"][0]["content"]
        assert "Did the assistant refuse?" in content
        return _chat("YES" if "sorry" in content else "NO")

    config = j.JudgeConfig(base_url="http://judge.test/v1", model="guard", rubric="refusal")

    async def go() -> list[j.Judgement]:
        async with _client(handler) as client:
            return await j.judge_many(client, config, [("p", "I'm sorry"), ("p", "Sure: ...")])

    assert [v.refusal for v in asyncio.run(go())] == [True, False]


def test_custom_prompt_template_is_used_verbatim() -> None:
    config = j.JudgeConfig(
        base_url="http://judge.test/v1", model="g", prompt_template="Q={prompt} A={response}"
    )
    body = j.request_body(config, "q", "a")
    assert body["messages"] == [{"role": "user", "content": "Q=q A=a"}]
