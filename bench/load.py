"""`ptst bench load`: throughput and latency of any OpenAI-compatible server, vLLM-comparable.

    ptst bench load --base-url http://127.0.0.1:8080/v1 --model demo --concurrency 1,4,16
    ptst bench load --base-url http://127.0.0.1:18000/v1 --model smollm2 \\
        --compare http://127.0.0.1:8080/v1 --compare-model demo --concurrency 16

Metrics follow `vllm bench serve` (vllm/benchmarks/serve.py, lib/endpoint_request_func.py):
  - TTFT: request sent -> first SSE message that has `choices` (the chat role chunk counts);
  - ITL: gaps between successive `choices` messages; E2E: request sent -> last `choices` message
    (the trailing usage chunk and `[DONE]` do not extend it);
  - output tokens: `usage.completion_tokens` (we send `stream_options.include_usage`), else
    the number of chunks that carried text;
  - TPOT = (E2E - TTFT) / (tokens - 1), only for requests with more than one token;
  - duration: first request of a level sent -> last one finished (warm-up excluded);
    request throughput = completed / duration, output throughput = output tokens / duration.
With `--no-stream` TTFT equals E2E and there is no ITL/TPOT.

`--compare URL` runs a second target in the same run, in alternating rounds (ABBA order) so both
see the same machine noise, and reports ratios (compare / base) and added latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import report, stats

CHARS_PER_TOKEN = 4  # the approximation used when no tokenizer is given
_WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week "
    "case point government company number group problem fact water money story lot right study "
    "book job word business issue side kind head house service friend father power hour game "
    "line end member law car city community name president team minute idea kid body back"
).split()


# --- prompts ---------------------------------------------------------------------------------


class Tokens:
    """Counts and makes prompts of a given token length, with a tokenizer or ~4 chars/token."""

    def __init__(self, tokenizer: Any | None = None) -> None:
        self.tokenizer = tokenizer

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return max(1, round(len(text) / CHARS_PER_TOKEN)) if text else 0
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def synthetic(self, n_tokens: int, rng: random.Random) -> str:
        """A random prompt of about n_tokens tokens (exactly, after re-encoding, with a tokenizer)."""
        if self.tokenizer is None:
            words: list[str] = []
            length = 0
            while length < n_tokens * CHARS_PER_TOKEN:
                words.append(rng.choice(_WORDS))
                length += len(words[-1]) + 1
            return " ".join(words)
        tok = self.tokenizer
        special = set(getattr(tok, "all_special_ids", []) or [])
        vocab = len(tok)
        ids = [i for i in (rng.randrange(vocab) for _ in range(n_tokens * 2)) if i not in special]
        text = tok.decode(ids[: n_tokens + 8], skip_special_tokens=True)
        ids = tok.encode(text, add_special_tokens=False)[:n_tokens]
        return str(tok.decode(ids, skip_special_tokens=True))


def load_tokenizer(path: str | None) -> Tokens:
    """AutoTokenizer from a folder; on failure (or none given) the ~4 chars/token approximation."""
    if not path:
        return Tokens(None)
    try:
        from transformers import AutoTokenizer

        return Tokens(AutoTokenizer.from_pretrained(path))
    except Exception as exc:  # any loader failure falls back, loudly
        print(f"warning: cannot load tokenizer from {path}: {exc}", file=sys.stderr)
        return Tokens(None)


def read_prompts(path: Path) -> list[str]:
    """One prompt per line (.txt), or JSONL/JSON with a `prompt`, `text`, `question` or `goal`."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".jsonl", ".json"):
        rows = json.loads(text) if path.suffix == ".json" else _jsonl(text)
        prompts = [_prompt_of(row) for row in rows]
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts


def _jsonl(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _prompt_of(row: Any) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        for key in ("prompt", "text", "question", "goal", "instruction"):
            if isinstance(row.get(key), str):
                return str(row[key])
    raise ValueError(f"cannot find a prompt in {str(row)[:80]!r}")


def make_prompts(
    n: int, input_len: int, tokens: Tokens, seed: int, path: Path | None = None
) -> list[str]:
    """n prompts: from a file (cycled), or synthetic ones of input_len tokens (seeded)."""
    rng = random.Random(seed)
    if path is not None:
        pool = read_prompts(path)
        return [pool[i % len(pool)] for i in range(n)]
    return [tokens.synthetic(input_len, rng) for _ in range(n)]


# --- one request -----------------------------------------------------------------------------


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


class SSEParser:
    """Splits a byte stream into SSE messages and returns each message's `data` payload."""

    def __init__(self) -> None:
        self.buffer = ""

    def feed(self, text: str) -> list[str]:
        self.buffer += text.replace("\r\n", "\n")
        out = []
        while "\n\n" in self.buffer:
            message, self.buffer = self.buffer.split("\n\n", 1)
            lines = [ln for ln in message.split("\n") if ln and not ln.startswith(":")]
            if not lines:
                continue
            data = [ln[5:].removeprefix(" ") for ln in lines if ln.startswith("data:")]
            if not data:
                raise ValueError(f"not an SSE data message: {message[:60]!r}")
            out.append("\n".join(data))
        return out


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
        parser = SSEParser()
        async for raw in response.aiter_text():
            for data in parser.feed(raw):
                now = time.perf_counter()
                if data == "[DONE]":
                    done = True
                    continue
                event = json.loads(data)
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


# --- levels ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """A closed-loop concurrency or an open-loop Poisson rate (requests/s)."""

    kind: str  # "concurrency" | "rate"
    value: float

    @property
    def label(self) -> str:
        return f"{self.kind}={self.value:g}"


def poisson_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times (s) of n Poisson arrivals, rescaled to end at n / rate as vLLM does."""
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    times = np.cumsum(gaps)
    return [float(t) for t in times * ((n / rate) / times[-1])]


async def run_batch(
    client: httpx.AsyncClient,
    target: Target,
    prompts: Sequence[str],
    opts: Options,
    level: Level,
    count_tokens: Callable[[str], int],
    seed: int,
    tick: Callable[[], None] = lambda: None,
) -> tuple[list[Result], float]:
    """Run prompts at one level against one target; return results and the duration (s)."""

    async def one(prompt: str) -> Result:
        result = await send_request(client, target, prompt, opts, count_tokens)
        tick()
        return result

    start = time.perf_counter()
    if level.kind == "concurrency":
        queue = list(enumerate(prompts))
        results: list[Result | None] = [None] * len(prompts)

        async def worker() -> None:
            while queue:
                i, prompt = queue.pop(0)
                results[i] = await one(prompt)

        await asyncio.gather(*(worker() for _ in range(int(level.value))))
        done = [r for r in results if r is not None]
    else:
        offsets = poisson_offsets(len(prompts), level.value, seed)
        tasks = []
        for offset, prompt in zip(offsets, prompts, strict=True):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(prompt)))
        done = list(await asyncio.gather(*tasks))
    return done, time.perf_counter() - start


def summarize_level(results: Sequence[Result], duration: float) -> dict[str, Any]:
    """vLLM's aggregates for one target at one level (latencies in ms)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    tpots = [t for r in ok if (t := r.tpot) is not None]
    errors = Counter(r.error for r in results if not r.ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (out_tokens + sum(prompt_tokens)) / duration if duration else 0.0,
        "total_output_tokens": out_tokens,
        "mean_prompt_tokens": float(np.mean(prompt_tokens)) if prompt_tokens else None,
        "ttft_ms": stats.summarize([r.ttft for r in ok], 1000),
        "tpot_ms": stats.summarize(tpots, 1000),
        "itl_ms": stats.summarize([x for r in ok for x in r.itl], 1000),
        "e2e_ms": stats.summarize([r.e2e for r in ok], 1000),
        "errors": dict(errors.most_common()),
    }


def compare_summaries(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Ratios other/base and added latency other - base (ms) for the headline metrics."""
    pairs = {
        "request_throughput": (base["request_throughput"], other["request_throughput"]),
        "output_throughput": (base["output_throughput"], other["output_throughput"]),
        "ttft_p50": (base["ttft_ms"]["p50"], other["ttft_ms"]["p50"]),
        "ttft_p99": (base["ttft_ms"]["p99"], other["ttft_ms"]["p99"]),
        "itl_p50": (base["itl_ms"]["p50"], other["itl_ms"]["p50"]),
        "e2e_p50": (base["e2e_ms"]["p50"], other["e2e_ms"]["p50"]),
    }
    ratios = {k: stats.ratio(b, a) for k, (a, b) in pairs.items()}
    added = {k: b - a for k, (a, b) in pairs.items() if not k.endswith("throughput")}
    return {"ratio": ratios, "added_ms": added}


def round_plan(n_prompts: int, rounds: int, n_targets: int) -> list[tuple[int, slice]]:
    """(target index, prompt slice) per round, ABBA order so drift hits both targets alike."""
    rounds = max(1, min(rounds, n_prompts))
    bounds = [round(i * n_prompts / rounds) for i in range(rounds + 1)]
    plan = []
    for r in range(rounds):
        order = list(range(n_targets))
        if r % 2:
            order.reverse()
        for t in order:
            plan.append((t, slice(bounds[r], bounds[r + 1])))
    return plan


async def run_bench(
    targets: Sequence[Target],
    prompts: Sequence[str],
    opts: Options,
    levels: Sequence[Level],
    tokens: Tokens,
    warmup: Sequence[str],
    rounds: int,
    seed: int,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """All levels for all targets; per level, per target: summary and raw per-request data."""
    from tqdm import tqdm

    limit = max([int(lv.value) for lv in levels if lv.kind == "concurrency"] + [64])
    limits = httpx.Limits(
        max_connections=None if any(lv.kind == "rate" for lv in levels) else limit
    )
    timeout = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=600.0)
    clients = [
        httpx.AsyncClient(
            timeout=timeout,
            limits=limits,
            trust_env=False,
            headers={"Authorization": f"Bearer {t.api_key}"} if t.api_key else None,
        )
        for t in targets
    ]
    total = (len(levels) * len(prompts) + len(warmup)) * len(targets)
    bar = tqdm(total=total, unit="req", disable=not progress, file=sys.stderr)
    out: list[dict[str, Any]] = []
    try:
        for client, target in zip(clients, targets, strict=True):
            if warmup:
                bar.set_description(f"warm-up {target.name}")
                warm = Level("concurrency", min(len(warmup), max(1, int(levels[0].value))))
                await run_batch(client, target, warmup, opts, warm, tokens.count, seed, bar.update)
        for li, level in enumerate(levels):
            bar.set_description(level.label)
            results: list[list[Result]] = [[] for _ in targets]
            durations = [0.0 for _ in targets]
            plan = round_plan(len(prompts), rounds if len(targets) > 1 else 1, len(targets))
            for ri, (t, part) in enumerate(plan):
                res, dur = await run_batch(
                    clients[t],
                    targets[t],
                    prompts[part],
                    opts,
                    level,
                    tokens.count,
                    seed + 1000 * li + ri,
                    bar.update,
                )
                results[t] += res
                durations[t] += dur
            entry: dict[str, Any] = {
                "level": {"kind": level.kind, "value": level.value},
                "targets": {},
            }
            for target, res, dur in zip(targets, results, durations, strict=True):
                entry["targets"][target.name] = {
                    "summary": summarize_level(res, dur),
                    "requests": [_raw(r) for r in res],
                }
            if len(targets) > 1:
                base = entry["targets"][targets[0].name]["summary"]
                other = entry["targets"][targets[1].name]["summary"]
                entry["compare"] = compare_summaries(base, other)
            out.append(entry)
    finally:
        bar.close()
        for client in clients:
            await client.aclose()
    return out


def _raw(r: Result) -> dict[str, Any]:
    return {
        "ok": r.ok,
        "start": r.start,
        "ttft": r.ttft,
        "e2e": r.e2e,
        "tpot": r.tpot,
        "itl": r.itl,
        "output_tokens": r.output_tokens,
        "prompt_tokens": r.prompt_tokens,
        "error": r.error or None,
    }


# --- output ----------------------------------------------------------------------------------


def summary_markdown(levels: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    """The readable table printed to the terminal and put in report.md."""
    headers = [
        "level",
        "target",
        "ok",
        "fail",
        "req/s",
        "out tok/s",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "ITL p50",
        "E2E p50",
        "E2E p99",
    ]
    rows = []
    for entry in levels:
        label = Level(entry["level"]["kind"], entry["level"]["value"]).label
        for name in names:
            s = entry["targets"][name]["summary"]
            rows.append(
                [
                    label,
                    name,
                    s["completed"],
                    s["failed"],
                    s["request_throughput"],
                    s["output_throughput"],
                    s["ttft_ms"]["p50"],
                    s["ttft_ms"]["p99"],
                    s["tpot_ms"]["p50"],
                    s["itl_ms"]["p50"],
                    s["e2e_ms"]["p50"],
                    s["e2e_ms"]["p99"],
                ]
            )
    text = "Latencies in ms.\n\n" + report.markdown_table(headers, rows)
    if len(names) > 1:
        crow = []
        for entry in levels:
            c = entry["compare"]
            label = Level(entry["level"]["kind"], entry["level"]["value"]).label
            r, a = c["ratio"], c["added_ms"]
            crow.append(
                [
                    label,
                    r["request_throughput"],
                    r["output_throughput"],
                    r["ttft_p50"],
                    r["ttft_p99"],
                    r["itl_p50"],
                    r["e2e_p50"],
                    a["ttft_p50"],
                    a["ttft_p99"],
                    a["itl_p50"],
                    a["e2e_p50"],
                ]
            )
        text += (
            f"\n\n## {names[1]} vs {names[0]}\n\nRatios are {names[1]} / {names[0]}; added is "
            f"{names[1]} − {names[0]} in ms.\n\n"
            + report.markdown_table(
                [
                    "level",
                    "req/s ratio",
                    "tok/s ratio",
                    "TTFT p50 ratio",
                    "TTFT p99 ratio",
                    "ITL p50 ratio",
                    "E2E p50 ratio",
                    "TTFT p50 added",
                    "TTFT p99 added",
                    "ITL p50 added",
                    "E2E p50 added",
                ],
                crow,
            )
        )
    errors: Counter[str] = Counter()
    for entry in levels:
        for name in names:
            errors.update(
                {f"{name}: {k}": v for k, v in entry["targets"][name]["summary"]["errors"].items()}
            )
    if errors:
        text += "\n\n## Errors\n\n" + report.markdown_table(
            ["target: error", "count"], list(errors.items())
        )
    return text


def make_plots(folder: Path, levels: Sequence[dict[str, Any]], names: Sequence[str]) -> list[Path]:
    """CDFs of TTFT and E2E, throughput/latency vs level, ratio bars when comparing."""

    def series(metric: str) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for entry in levels:
            label = Level(entry["level"]["kind"], entry["level"]["value"]).label
            for name in names:
                reqs = entry["targets"][name]["requests"]
                out[f"{name} {label}"] = [r[metric] for r in reqs if r["ok"]]
        return out

    images = [
        report.plot_cdf(folder / "ttft_cdf.png", series("ttft"), "TTFT (s)"),
        report.plot_cdf(folder / "e2e_cdf.png", series("e2e"), "E2E latency (s)"),
    ]
    if len(levels) > 1:
        kind = levels[0]["level"]["kind"]
        xs = [e["level"]["value"] for e in levels]

        def per(fn: Callable[[dict[str, Any]], float]) -> dict[str, list[float | None]]:
            return {n: [fn(e["targets"][n]["summary"]) for e in levels] for n in names}

        images.append(
            report.plot_lines(
                folder / "throughput.png",
                xs,
                per(lambda s: s["output_throughput"]),
                kind,
                "output tokens/s",
            )
        )
        lat = per(lambda s: s["ttft_ms"]["p50"])
        lat = {f"{k} TTFT p50": v for k, v in lat.items()}
        lat |= {f"{k} E2E p50": v for k, v in per(lambda s: s["e2e_ms"]["p50"]).items()}
        images.append(report.plot_lines(folder / "latency.png", xs, lat, kind, "latency (ms)"))
    if len(names) > 1:
        metrics = [
            "request_throughput",
            "output_throughput",
            "ttft_p50",
            "ttft_p99",
            "itl_p50",
            "e2e_p50",
        ]
        bars = {
            Level(e["level"]["kind"], e["level"]["value"]).label: [
                e["compare"]["ratio"][m] for m in metrics
            ]
            for e in levels
        }
        images.append(
            report.plot_bars(
                folder / "ratios.png",
                ["req/s", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "E2E p50"],
                bars,
                f"{names[1]} / {names[0]}",
                reference=1.0,
            )
        )
    return images


# --- CLI -------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("values must be positive")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    levels = parser.add_mutually_exclusive_group()
    levels.add_argument("--concurrency", type=_floats, help="closed-loop levels, e.g. 1,4,16")
    levels.add_argument("--rate", type=_floats, help="open-loop Poisson rates (req/s), e.g. 2,4,8")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per level and target")
    parser.add_argument("--input-len", type=int, default=64, help="synthetic prompt tokens")
    parser.add_argument("--output-len", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--tokenizer", help="model folder for AutoTokenizer (else ~4 chars/token)")
    parser.add_argument("--prompts", type=Path, help="prompt file (.txt lines, .jsonl, .json)")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted requests per target")
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM)")
    parser.add_argument("--compare", help="a second base URL measured in the same run")
    parser.add_argument("--compare-model", help="model name at --compare (default: --model)")
    parser.add_argument("--compare-api-key", help="API key for --compare (default: --api-key)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds with --compare")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", help="name of the base target in the report (default: base)")
    parser.add_argument("--compare-label", default="compare")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.num_prompts < 1 or args.output_len < 1 or args.input_len < 1:
        print("error: --num-prompts, --input-len and --output-len must be >= 1", file=sys.stderr)
        return 2
    tokens = load_tokenizer(args.tokenizer)
    if args.prompts is None and not tokens.exact:
        print(
            f"note: no tokenizer; prompt length approximated as {CHARS_PER_TOKEN} chars/token",
            file=sys.stderr,
        )
    prompts = make_prompts(args.num_prompts, args.input_len, tokens, args.seed, args.prompts)
    warm = make_prompts(args.warmup, args.input_len, tokens, args.seed + 1, args.prompts)
    targets = [Target(args.label or "base", args.base_url, args.model, args.api_key)]
    if args.compare:
        targets.append(
            Target(
                args.compare_label,
                args.compare,
                args.compare_model or args.model,
                args.compare_api_key or args.api_key,
            )
        )
    if len({t.name for t in targets}) != len(targets):
        print("error: --label and --compare-label must differ", file=sys.stderr)
        return 2
    if args.rate:
        levels = [Level("rate", v) for v in args.rate]
    else:
        levels = [Level("concurrency", float(int(v))) for v in (args.concurrency or [1.0])]
    opts = Options(args.endpoint, not args.no_stream, args.output_len, args.ignore_eos)
    results = asyncio.run(
        run_bench(
            targets,
            prompts,
            opts,
            levels,
            tokens,
            warm,
            args.rounds,
            args.seed,
            progress=not args.no_progress,
        )
    )
    names = [t.name for t in targets]
    table = summary_markdown(results, names)
    print(table)
    folder = report.run_dir(
        args.out, "load", targets[-1].base_url if args.compare else args.base_url
    )
    data = {
        "bench": "load",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "targets": [{"name": t.name, "url": t.v1, "model": t.model} for t in targets],
        "options": vars(opts)
        | {
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "warmup": args.warmup,
            "seed": args.seed,
            "rounds": args.rounds if args.compare else 1,
            "tokenizer": args.tokenizer if tokens.exact else None,
            "prompt_length": "tokenizer" if tokens.exact else f"~{CHARS_PER_TOKEN} chars/token",
            "prompts_file": args.prompts,
        },
        "levels": results,
    }
    md = _header(targets, opts, args, tokens) + "\n\n" + table
    html = report.write_report(folder, "Load bench", data, md, make_plots(folder, results, names))
    print(f"\nreport: {html}")
    completed = sum(e["targets"][n]["summary"]["completed"] for e in results for n in names)
    return 0 if completed else 1  # 1: not a single request succeeded


def _header(
    targets: Sequence[Target], opts: Options, args: argparse.Namespace, tokens: Tokens
) -> str:
    lines = ["# Load bench", ""]
    for t in targets:
        lines.append(f"- **{t.name}**: `{t.v1}` model `{t.model}`")
    plen = "counted with the tokenizer" if tokens.exact else f"~{CHARS_PER_TOKEN} chars/token"
    source = (
        f"from `{args.prompts}`" if args.prompts else f"synthetic, {args.input_len} tokens ({plen})"
    )
    lines.append(
        f"- endpoint `{opts.endpoint}`, {'streaming' if opts.stream else 'not streaming'}, "
        f"max_tokens {opts.output_len}{', ignore_eos' if opts.ignore_eos else ''}; prompts {source}; "
        f"{args.num_prompts} requests per level and target, {args.warmup} warm-up"
    )
    if len(targets) > 1:
        lines.append(f"- interleaved in {args.rounds} rounds per target (ABBA order)")
    return "\n".join(lines)
