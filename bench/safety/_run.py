"""The whole run: plan, fetch (resuming from the cache), judge, summarize, write."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ptst.bench import judge as judging
from ptst.bench.report import run_dir, slugify, write_report
from ptst.bench.safety._fetch import fetch_all, judge_all
from ptst.bench.safety._plan import Job, Options, plan, plan_tasks, targets_for
from ptst.bench.safety._prompts import PromptSet, load_prompt_set
from ptst.bench.safety._report import markdown_report, plot_accuracy, plot_rates
from ptst.bench.safety._requests import DEFAULT_TEMPLATE, JsonlCache, Target, proxy_enforcer
from ptst.bench.safety._results import (
    Cell,
    Row,
    TaskCell,
    TaskRow,
    build_rows,
    build_task_rows,
    paired,
    ptst_matrix,
    summarize,
    summarize_tasks,
)
from ptst.bench.safety._tasks import TaskSet, load_task_set
from ptst.bench.wilson import Rate

TASK_SCORING = (
    "exact numeric match of the gold number (after the dataset answer's last '####') and the "
    "answer's number: the first number after its last '####', else the last number in it"
)


@dataclass
class Outcome:
    folder: Path
    cells: list[Cell]
    rows: list[Row]
    sent: int  # requests actually sent upstream (cache misses), prompts and tasks
    task_cells: list[TaskCell] = field(default_factory=list)
    task_rows: list[TaskRow] = field(default_factory=list)


async def run_safety(options: Options, client: httpx.AsyncClient | None = None) -> Outcome:
    """Plan, fetch (resuming from the cache), judge, summarize and write the report."""
    sets = [load_prompt_set(spec, options.benign_sets) for spec in options.prompt_specs]
    tasks = [load_task_set(spec) for spec in options.task_specs]
    targets = targets_for(options)
    needs_templates = any(not t.via_proxy and t.template != DEFAULT_TEMPLATE for t in targets)
    enforce = proxy_enforcer(options.templates_dir) if needs_templates else None
    jobs = plan(sets, targets, options, enforce)
    task_jobs = plan_tasks(tasks, targets, options, enforce)

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
        answers, sent = await fetch_all(http, [*jobs, *task_jobs], options, responses)
        verdicts: dict[str, judging.Judgement] = {}
        if options.judge is not None:
            verdicts = await _judge(http, options.judge, jobs, answers, sets, options, cache_dir)
    finally:
        responses.close()
        if own:
            await http.aclose()

    rows = build_rows(jobs, answers, verdicts, options.judge)
    cells = summarize(rows, sets, targets)
    task_rows = build_task_rows(task_jobs, answers, tasks)
    task_cells = summarize_tasks(task_rows, tasks, targets)
    folder = _write(options, sets, targets, cells, rows, tasks, task_cells, task_rows)
    return Outcome(folder, cells, rows, sent, task_cells, task_rows)


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
    tasks: Sequence[TaskSet] = (),
    task_cells: Sequence[TaskCell] = (),
    task_rows: Sequence[TaskRow] = (),
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
        "detector": "the proxy's refusal detector (`ptst.proxy.refusal.detect`)",
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
        "task_max_tokens": options.task_max_tokens,
        "task_limit": options.task_limit,
        "tasks": [
            {
                "name": t.name,
                "source": t.source,
                "size": len(t.questions),
                "used": len(t.questions)
                if options.task_limit is None
                else min(options.task_limit, len(t.questions)),
                "selection": "first N questions in file order",
                "scoring": TASK_SCORING,
            }
            for t in tasks
        ],
    }
    images = []
    for prompt_set in sets:
        mine = [c for c in cells if c.set == prompt_set.name]
        what = "over-refusal" if prompt_set.benign else "refusal"
        path = folder / f"refusal-{slugify(prompt_set.name)}.png"
        images.append(plot_rates(path, mine, f"{prompt_set.name}: {what} rate by template"))
    for task in tasks:
        done = [c for c in task_cells if c.set == task.name]
        path = folder / f"accuracy-{slugify(task.name)}.png"
        images.append(plot_accuracy(path, done, f"{task.name}: accuracy by template"))
    comparisons = paired(rows, sets, targets)
    markdown = markdown_report(cells, sets, targets, meta, comparisons, task_cells, tasks)
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
        "task_cells": [_task_cell_json(c) for c in task_cells],
        "task_matrix": {
            t.name: {
                train: {test: _task_cell_json(c) for test, c in row.items()}
                for train, row in (ptst_matrix(task_cells, t.name) or {}).items()
            }
            for t in tasks
        },
        "task_rows": [asdict(r) for r in task_rows],
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


def _task_cell_json(cell: TaskCell) -> dict[str, Any]:
    return {**asdict(cell), "accuracy": _rate_json(cell.accuracy)}


def _rate_json(value: Rate) -> dict[str, Any]:
    return {**asdict(value), "rate": value.value}
