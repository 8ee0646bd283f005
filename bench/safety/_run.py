"""The whole run: plan, fetch (resuming from the cache), judge, summarize, write."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from ptst.bench import judge as judging
from ptst.bench.report import run_dir, slugify, write_report
from ptst.bench.safety._fetch import fetch_all, judge_all
from ptst.bench.safety._plan import Job, Options, plan, targets_for
from ptst.bench.safety._prompts import PromptSet, load_prompt_set
from ptst.bench.safety._report import markdown_report, plot_rates
from ptst.bench.safety._requests import DEFAULT_TEMPLATE, JsonlCache, Target, proxy_enforcer
from ptst.bench.safety._results import (
    Cell,
    Row,
    build_rows,
    paired,
    ptst_matrix,
    summarize,
)
from ptst.bench.wilson import Rate


@dataclass
class Outcome:
    folder: Path
    cells: list[Cell]
    rows: list[Row]
    sent: int  # requests actually sent upstream (cache misses)


async def run_safety(options: Options, client: httpx.AsyncClient | None = None) -> Outcome:
    """Plan, fetch (resuming from the cache), judge, summarize and write the report."""
    sets = [load_prompt_set(spec, options.benign_sets) for spec in options.prompt_specs]
    targets = targets_for(options)
    needs_templates = any(not t.via_proxy and t.template != DEFAULT_TEMPLATE for t in targets)
    enforce = proxy_enforcer(options.templates_dir) if needs_templates else None
    jobs = plan(sets, targets, options, enforce)

    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    own = client is None
    http = client or httpx.AsyncClient(
        timeout=httpx.Timeout(options.timeout, connect=10.0),
        limits=httpx.Limits(max_connections=max(options.concurrency * 2, 10)),
        headers=headers,
    )
    cache_dir = options.cache_dir
    responses = JsonlCache(cache_dir / "responses.jsonl")
    try:
        answers, sent = await fetch_all(http, jobs, options, responses)
        verdicts: dict[str, judging.Judgement] = {}
        if options.judge is not None:
            verdicts = await _judge(http, options.judge, jobs, answers, sets, options, cache_dir)
    finally:
        responses.close()
        if own:
            await http.aclose()

    rows = build_rows(jobs, answers, verdicts, options.judge)
    cells = summarize(rows, sets, targets)
    folder = _write(options, sets, targets, cells, rows)
    return Outcome(folder=folder, cells=cells, rows=rows, sent=sent)


async def _judge(
    client: httpx.AsyncClient,
    config: judging.JudgeConfig,
    jobs: Sequence[Job],
    answers: dict[str, dict[str, Any]],
    sets: Sequence[PromptSet],
    options: Options,
    cache_dir: Path,
) -> dict[str, judging.Judgement]:
    """The harm rubric judges harmful sets; the refusal rubric judges every set."""
    benign = {s.name for s in sets if s.benign}
    pairs = []
    for job in jobs:
        text = answers[job.key].get("response")
        if isinstance(text, str) and (config.rubric == "refusal" or job.set_name not in benign):
            pairs.append((job.prompt, text))
    pairs = list(dict.fromkeys(pairs))
    cache = JsonlCache(cache_dir / f"judge-{config.rubric}.jsonl")
    try:
        return await judge_all(client, config, pairs, cache, options.concurrency, options.progress)
    finally:
        cache.close()


def _write(
    options: Options,
    sets: Sequence[PromptSet],
    targets: Sequence[Target],
    cells: Sequence[Cell],
    rows: Sequence[Row],
) -> Path:
    target_name = "+".join(dict.fromkeys(t.model for t in targets))
    folder = run_dir(options.out, "safety", target_name)
    meta = {
        "base_url": options.base_url,
        "via_proxy": options.via_proxy,
        "models": options.models,
        "templates": list(dict.fromkeys(t.template for t in targets)),
        "temperature": options.sampling.temperature,
        "max_tokens": options.sampling.max_tokens,
        "limit": options.limit,
        "every": options.every,
        "detector": "the proxy's refusal detector (`proxy.refusal.detect`)",
        "judge": (
            {
                "model": options.judge.model,
                "base_url": options.judge.base_url,
                "rubric": options.judge.rubric,
            }
            if options.judge
            else None
        ),
        "sets": [
            {"name": s.name, "benign": s.benign, "source": s.source, "size": len(s.prompts)}
            for s in sets
        ],
    }
    images = []
    for prompt_set in sets:
        mine = [c for c in cells if c.set == prompt_set.name]
        what = "over-refusal" if prompt_set.benign else "refusal"
        path = folder / f"refusal-{slugify(prompt_set.name)}.png"
        images.append(plot_rates(path, mine, f"{prompt_set.name}: {what} rate by template"))
    comparisons = paired(rows, sets, targets)
    markdown = markdown_report(cells, sets, targets, meta, comparisons)
    markdown += "\n## Plots\n\n" + "\n\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n"
    data = {
        "meta": meta,
        "cells": [_cell_json(c) for c in cells],
        "ptst_matrix": {
            s.name: {
                train: {test: _cell_json(c) for test, c in row.items()}
                for train, row in (ptst_matrix(cells, s.name) or {}).items()
            }
            for s in sets
        },
        "paired": [asdict(p) for p in comparisons],
        "rows": [asdict(r) for r in rows],
    }
    write_report(folder, "Safety bench", data, markdown, images)
    return folder


def _cell_json(cell: Cell) -> dict[str, Any]:
    out = asdict(cell)
    for name in ("refusal", "attack_success", "judge_refusal"):
        value: Rate | None = getattr(cell, name)
        if value is not None:
            out[name] = _rate_json(value)
    out["baselines"] = {name: _rate_json(r) for name, r in cell.baselines.items()}
    return out


def _rate_json(value: Rate) -> dict[str, Any]:
    return {**asdict(value), "rate": value.value}
