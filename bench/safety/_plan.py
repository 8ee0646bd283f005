"""What a run sends: its options, the targets, and one job per (set, prompt, target) and per
(task set, question, target)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ptst.bench import judge as judging
from ptst.bench.safety._prompts import PromptSet, sample
from ptst.bench.safety._requests import (
    DEFAULT_TEMPLATE,
    Enforcer,
    Sampling,
    Target,
    cache_key,
    request_body,
)
from ptst.bench.safety._tasks import TaskSet

DEFAULT_CACHE = Path("results/.cache/safety")
DEFAULT_TASK_MAX_TOKENS = 256  # GSM8K solutions run ~100-200 tokens before their "#### N"


@dataclass(frozen=True)
class Job:
    set_name: str
    index: int
    prompt: str
    target: Target
    body: dict[str, Any]
    key: str


@dataclass
class Options:
    base_url: str
    models: list[str]
    templates: list[str] = field(default_factory=lambda: [DEFAULT_TEMPLATE])
    prompt_specs: list[str] = field(default_factory=lambda: ["builtin-harmful", "builtin-benign"])
    benign_sets: list[str] = field(default_factory=list)
    limit: int | None = None
    every: int = 1
    sampling: Sampling = Sampling()  # noqa: RUF009 (frozen: a shared default is safe)
    task_specs: list[str] = field(default_factory=list)
    task_limit: int | None = None  # the first N questions of each task set
    task_max_tokens: int = DEFAULT_TASK_MAX_TOKENS
    concurrency: int = 8
    api_key: str | None = None
    via_proxy: bool = False
    proxy_config: Path | None = None
    trained_with: dict[str, str] = field(default_factory=dict)
    templates_dir: Path | None = None
    judge: judging.JudgeConfig | None = None
    cache_dir: Path = DEFAULT_CACHE
    out: Path = Path("results")
    timeout: float = 600.0
    retries: int = 2
    progress: bool = True


def targets_for(options: Options) -> list[Target]:
    """Model x template (local templating), or one target per route (`--via-proxy`)."""
    if not options.via_proxy:
        return [
            Target(m, t, options.trained_with.get(m))
            for m in options.models
            for t in options.templates
        ]
    routes: dict[str, Any] = {}
    if options.proxy_config is not None:
        from ptst.proxy.config import load_settings

        routes = {r.model: r for r in load_settings(options.proxy_config).routes}
    targets = []
    for model in options.models:
        route = routes.get(model)
        template = (route.template or "none") if route else "proxy"
        trained = (route.trained_with if route else None) or options.trained_with.get(model)
        targets.append(Target(model, template, trained, via_proxy=True))
    return targets


def plan(
    sets: Sequence[PromptSet], targets: Sequence[Target], options: Options, enforce: Enforcer | None
) -> list[Job]:
    """Every (set, prompt, target) request, in a stable order."""
    jobs = []
    for prompt_set in sets:
        for index, prompt in sample(prompt_set.prompts, options.limit, options.every):
            for target in targets:
                body = request_body(prompt, target, options.sampling, enforce)
                key = cache_key(prompt, target, body)
                jobs.append(Job(prompt_set.name, index, prompt, target, body, key))
    return jobs


def plan_tasks(
    task_sets: Sequence[TaskSet],
    targets: Sequence[Target],
    options: Options,
    enforce: Enforcer | None,
) -> list[Job]:
    """Every (task set, question, target) request: the first `task_limit` questions, sent like
    the prompts (same templating, cache and temperature) but with `task_max_tokens`."""
    sampling = replace(options.sampling, max_tokens=options.task_max_tokens)
    jobs = []
    for task_set in task_sets:
        for index, question in sample(task_set.questions, options.task_limit, 1):
            for target in targets:
                body = request_body(question, target, sampling, enforce)
                key = cache_key(question, target, body)
                jobs.append(Job(task_set.name, index, question, target, body, key))
    return jobs
