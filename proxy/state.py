"""The proxy's live state: one immutable snapshot of settings + templates, swapped atomically on
reload, and the long-lived parts (upstream pool, metrics, audit log) owned by the app's lifespan."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ptst.proxy.audit import AuditLog
from ptst.proxy.config import Mode, Route, Settings, load_settings
from ptst.proxy.drain import Drain
from ptst.proxy.errors import NotFound
from ptst.proxy.metrics import Metrics
from ptst.proxy.rewrite import Policy
from ptst.proxy.second_stage import Rescorer
from ptst.proxy.templates import Template, load_templates
from ptst.proxy.tokens import special_tokens
from ptst.proxy.upstream import Upstreams


class SnapshotError(Exception):
    """A config or template set that cannot serve; the message says which file and why."""


@dataclass(frozen=True)
class Snapshot:
    settings: Settings
    templates: dict[str, Template]
    policies: dict[str, Policy]  # by route name, built once per snapshot

    def resolve(self, model: str) -> tuple[Route, Template | None, Mode, Policy]:
        route = self.settings.route(model)
        if route is None:
            known = ", ".join(r.model for r in self.settings.routes) or "none"
            raise NotFound(
                f"model {model!r} is not served by this proxy (models: {known})",
                param="model",
                code="model_not_found",
            )
        policy = self.policies[route.model]
        if route.template is None:
            return route, None, "messages", policy
        template = self.templates[route.template]
        return route, template, route.mode or template.mode, policy


def build_snapshot(settings: Settings, config_path: Path | None = None) -> Snapshot:
    """Load (or reload) settings and templates; every route must name templates that exist."""
    try:
        if config_path is not None:
            settings = load_settings(config_path)
        templates = load_templates(settings.templates_dir)
    except Exception as exc:  # ConfigError, TemplateError: both carry a file-naming message
        raise SnapshotError(str(exc)) from exc
    where = str(settings.source or "config")
    policies = {}
    for i, route in enumerate(settings.routes):
        for key in ("template", "trained_with"):
            name = getattr(route, key)
            if name is not None and name not in templates:
                raise SnapshotError(
                    f"{where}: routes.{i}.{key}: unknown template {name!r} "
                    f"(templates in {settings.templates_dir}: {', '.join(sorted(templates))})"
                )
        if route.template is not None:
            template = templates[route.template]
            if (route.mode or template.mode) == "prompt" and not template.supports_prompt_mode:
                raise SnapshotError(
                    f"{where}: routes.{i}.mode: template {route.template!r} has no prompt "
                    "template, so it cannot serve in prompt mode"
                )
        try:
            policy = Policy.from_route(route)
        except ValueError as exc:
            raise SnapshotError(f"{where}: routes.{i}.extra_markers: {exc}") from None
        if route.tokenizer is not None:
            try:
                found = special_tokens(route.tokenizer)
            except ValueError as exc:
                raise SnapshotError(f"{where}: routes.{i}.tokenizer: {exc}") from None
            extra = tuple(dict.fromkeys(policy.extra_markers + found))
            policy = dataclasses.replace(policy, extra_markers=extra)
        policies[route.model] = policy
    return Snapshot(settings, templates, policies)


class ProxyState:
    def __init__(
        self,
        snapshot: Snapshot,
        upstreams: Upstreams,
        metrics: Metrics,
        audit: AuditLog,
        rescorer: Rescorer | None = None,
        drain: Drain | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.upstreams = upstreams
        self.metrics = metrics
        self.audit = audit
        self.rescorer = rescorer  # the refusal detector's second stage, when `log.second_stage`
        self.drain = drain  # the shutdown deadline: a request it cuts off is logged as such
