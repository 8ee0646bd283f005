"""Levels and runs: one batch per level and target, ABBA rounds, vLLM's aggregates."""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from ptst.bench import stats
from ptst.bench.load._prompts import Tokens
from ptst.bench.load._requests import Options, Result, Target, send_request


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
