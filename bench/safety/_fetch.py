"""Sending: chat completions with retries, and judge calls, both through the cache."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import httpx

from ptst.bench import judge as judging
from ptst.bench.safety._plan import Job, Options
from ptst.bench.safety._requests import JsonlCache


async def complete(client: httpx.AsyncClient, url: str, body: dict[str, Any], retries: int) -> str:
    """The assistant text of one chat completion; retries transport errors and 5xx/429."""
    for attempt in range(retries + 1):
        try:
            answer = await client.post(url, json=body)
            if answer.status_code < 400:
                content = answer.json()["choices"][0]["message"].get("content")
                return content if isinstance(content, str) else ""
            message = f"HTTP {answer.status_code}: {answer.text[:300]}"
            if answer.status_code < 500 and answer.status_code != 429:
                raise RuntimeError(message)
        except httpx.TransportError as exc:
            message = f"{type(exc).__name__}: {exc}"
        if attempt == retries:
            raise RuntimeError(message)
        await asyncio.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


async def fetch_all(
    client: httpx.AsyncClient,
    jobs: Sequence[Job],
    options: Options,
    cache: JsonlCache,
) -> tuple[dict[str, dict[str, Any]], int]:
    """Send every job not in the cache (bounded concurrency): (key -> record, requests sent).

    Failed requests come back with `error` set but are not cached, so a rerun retries them.
    """
    url = options.base_url.rstrip("/") + "/chat/completions"
    out: dict[str, dict[str, Any]] = {}
    todo: dict[str, Job] = {}
    for job in jobs:
        hit = cache.get(job.key)
        if hit is not None:
            out[job.key] = hit
        else:
            todo.setdefault(job.key, job)
    bar = _progress(len(jobs), len(jobs) - len(todo), options.progress)
    gate = asyncio.Semaphore(max(1, options.concurrency))

    async def one(job: Job) -> None:
        async with gate:
            try:
                text = await complete(client, url, job.body, options.retries)
            except (RuntimeError, httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                out[job.key] = {"key": job.key, "response": None, "error": str(exc)}
            else:
                record = {
                    "key": job.key,
                    "prompt": job.prompt,
                    "model": job.target.model,
                    "template": job.target.template,
                    "response": text,
                }
                cache.put(record)
                out[job.key] = record
            bar.update(1)

    try:
        await asyncio.gather(*(one(job) for job in todo.values()))
    finally:
        bar.close()
    return out, len(todo)


def _progress(total: int, done: int, enabled: bool, desc: str = "safety") -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, initial=done, desc=desc, unit="req", disable=not enabled, file=sys.stderr
    )


def judge_key(config: judging.JudgeConfig, prompt: str, response: str) -> str:
    payload = [config.model, config.rubric, config.template(), prompt, response]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


async def judge_all(
    client: httpx.AsyncClient,
    config: judging.JudgeConfig,
    pairs: Sequence[tuple[str, str]],
    cache: JsonlCache,
    concurrency: int,
    progress: bool = False,
) -> dict[str, judging.Judgement]:
    """Judge each (prompt, response) once: cached verdicts are reused, errors are not cached."""
    verdicts: dict[str, judging.Judgement] = {}
    todo: dict[str, tuple[str, str]] = {}
    for prompt, response in pairs:
        key = judge_key(config, prompt, response)
        hit = cache.get(key)
        if hit is not None:
            verdicts[key] = judging.Judgement(**hit["judgement"])
        else:
            todo[key] = (prompt, response)
    bar = _progress(len(pairs), len(pairs) - len(todo), progress, "judge")
    try:
        fresh = await judging.judge_many(
            client, config, list(todo.values()), concurrency, on_done=lambda _: bar.update(1)
        )
    finally:
        bar.close()
    for key, verdict in zip(todo, fresh, strict=True):
        verdicts[key] = verdict
        if verdict.ok:
            cache.put({"key": key, "judgement": asdict(verdict)})
    return verdicts
