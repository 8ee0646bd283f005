"""Targets and request bodies (templated with the proxy's own rewrite), their cache key,
and the on-disk JSONL cache that makes a run resumable."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TEMPLATE = "default"

# --- targets and request bodies ------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One model served with one template; `trained_with` places it in the PTST matrix."""

    model: str
    template: str
    trained_with: str | None = None
    via_proxy: bool = False


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    max_tokens: int = 48


Enforcer = Callable[[dict[str, Any], str], dict[str, Any]]


def proxy_enforcer(templates_dir: Path | None = None) -> Enforcer:
    """The proxy's own rewrite (`enforce_chat` with the default Policy) over its templates."""
    from ptst.proxy.rewrite import Policy, enforce_chat
    from ptst.proxy.templates import builtin_templates_dir, load_templates

    registry = load_templates(templates_dir or builtin_templates_dir())

    def enforce(body: dict[str, Any], template: str) -> dict[str, Any]:
        found = registry.get(template)
        if found is None:
            known = ", ".join(sorted(registry))
            raise ValueError(f"unknown template {template!r}; known: default, {known}")
        return dict(enforce_chat(body, found, Policy()))

    return enforce


def request_body(
    prompt: str, target: Target, sampling: Sampling, enforce: Enforcer | None
) -> dict[str, Any]:
    """The chat body sent upstream: the prompt as one user turn, templated unless `default`."""
    body: dict[str, Any] = {
        "model": target.model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": sampling.temperature,
        "max_tokens": sampling.max_tokens,
        "stream": False,
    }
    if target.via_proxy or target.template == DEFAULT_TEMPLATE:
        return body
    if enforce is None:
        raise ValueError(f"template {target.template!r} needs the proxy's templates")
    return enforce(body, target.template)


def cache_key(prompt: str, target: Target, body: dict[str, Any]) -> str:
    """sha256 of (prompt, template, model, via-proxy, the exact body: sampling, max_tokens)."""
    payload = {
        "prompt": prompt,
        "template": target.template,
        "model": target.model,
        "via_proxy": target.via_proxy,
        "body": body,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --- the on-disk cache -----------------------------------------------------------------------------


class JsonlCache:
    """Append-only JSONL of records with a `key`; the last record for a key wins.

    Each record is flushed as soon as it is written, so a killed run loses at most the
    requests in flight. A torn last line (a kill mid-write) is ignored on load.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        torn = False
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            torn = bool(text) and not text.endswith("\n")
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("key"), str):
                    self.records[record["key"]] = record
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        if torn:  # end the torn line so the next record starts on its own
            self._file.write("\n")

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def put(self, record: dict[str, Any]) -> None:
        self.records[record["key"]] = record
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
