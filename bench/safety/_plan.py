"""What a run sends: its options, the targets, and one job per (set, prompt, target)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
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

DEFAULT_CACHE = Path("results/.cache/safety")


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
