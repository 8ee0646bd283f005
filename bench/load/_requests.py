"""One request: its target, options and body, sent and timed as vLLM's request functions do."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from ptst.bench import stats
from ptst.proxy import sse


@dataclass
class Target:
    """One server to measure: its name in the report, URL, model and API key."""

    name: str
    base_url: str
    model: str
    api_key: str | None = None
    # what a chat request carries besides the prompt (bench.overhead mirrors the proxy's rewrite)
    prefix_messages: list[dict[str, Any]] = field(default_factory=list)
    user_format: str = "{prompt}"
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def v1(self) -> str:
        url = self.base_url.rstrip("/")
        return url if httpx.URL(url).path not in ("", "/") else url + "/v1"


@dataclass
class Options:
    endpoint: str = "chat"  # or "completions"
    stream: bool = True
    output_len: int = 64
    ignore_eos: bool = False


@dataclass
class Result:
    """What one request measured; times in seconds from when it was sent."""

    ok: bool
    start: float
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    text_chars: int = 0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return stats.tpot(self.e2e, self.ttft, self.output_tokens) if self.ok else None


def build_payload(target: Target, prompt: str, opts: Options) -> dict[str, Any]:
    """The request body: max_tokens fixed, ignore_eos when asked, usage requested in streams."""
    body: dict[str, Any] = {"model": target.model, **target.extra_body}
    if opts.endpoint == "chat":
        user = {"role": "user", "content": target.user_format.format(prompt=prompt)}
        body["messages"] = [*target.prefix_messages, user]
    else:
        body["prompt"] = prompt
    body["max_tokens"] = opts.output_len
    if opts.ignore_eos:
        body["ignore_eos"] = True
    if opts.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def send_request(
    client: httpx.AsyncClient,
    target: Target,
    prompt: str,
    opts: Options,
    count_tokens: Callable[[str], int],
) -> Result:
    """Send one request and time it the way vLLM's request functions do; never raises."""
    path = "/chat/completions" if opts.endpoint == "chat" else "/completions"
    url = target.v1 + path
    payload = build_payload(target, prompt, opts)
    start = time.perf_counter()
    result = Result(ok=False, start=start)
    try:
        if opts.stream:
            await _stream(client, url, payload, opts.endpoint == "chat", result)
        else:
            await _whole(client, url, payload, opts.endpoint == "chat", result, count_tokens)
    except httpx.HTTPError as exc:
        result.ok = False
        result.error = f"{type(exc).__name__}: {exc}".rstrip(": ")
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        result.ok = False
        result.error = f"bad response: {exc}"
    return result


async def _stream(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], chat: bool, result: Result
) -> None:
    start = result.start
    last = start
    chunks_with_text = 0
    usage_tokens: int | None = None
    done = False
    async with client.stream("POST", url, json=payload) as response:
        if response.status_code != 200:
            result.error = _http_error(response.status_code, await response.aread())
            return
        async for raw, event in sse.events(response.aiter_bytes()):
            now = time.perf_counter()
            if event == "[DONE]":
                done = True
                continue
            if event is None and b"data:" in raw:
                raise ValueError(f"stream event is not JSON: {raw[:60]!r}")
            if event is None:  # a comment or keep-alive
                continue
            if not isinstance(event, dict):
                raise ValueError("stream event is not a JSON object")
            if "error" in event:
                result.error = "error in stream: " + _message(event)
                return
            if choices := event.get("choices"):
                if last == start:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                piece = _piece(choices[0], chat)
                if piece:
                    chunks_with_text += 1
                    result.text_chars += len(piece)
            elif usage := event.get("usage"):
                usage_tokens = usage.get("completion_tokens")
                result.prompt_tokens = usage.get("prompt_tokens")
    if last == start:
        result.error = "no token chunk received"
    elif not done:
        result.error = "stream ended without [DONE]"
    else:
        result.ok = True
        result.e2e = last - start
        result.output_tokens = usage_tokens if usage_tokens is not None else chunks_with_text


async def _whole(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    chat: bool,
    result: Result,
    count_tokens: Callable[[str], int],
) -> None:
    response = await client.post(url, json=payload)
    now = time.perf_counter()
    if response.status_code != 200:
        result.error = _http_error(response.status_code, response.content)
        return
    body = response.json()
    choice = body["choices"][0]
    text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
    text = text or ""
    usage = body.get("usage") or {}
    result.ok = True
    result.ttft = result.e2e = now - result.start
    result.text_chars = len(text)
    result.prompt_tokens = usage.get("prompt_tokens")
    tokens = usage.get("completion_tokens")
    result.output_tokens = tokens if isinstance(tokens, int) else count_tokens(text)


def _piece(choice: dict[str, Any], chat: bool) -> str:
    if chat:
        return str((choice.get("delta") or {}).get("content") or "")
    return str(choice.get("text") or "")


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))[:200]
    return str(body)[:200]


def _http_error(status: int, content: bytes) -> str:
    try:
        detail = _message(json.loads(content))
    except ValueError:
        detail = content[:120].decode("utf-8", "replace")
    return f"HTTP {status}: {detail}".rstrip(": ")
