"""Safe-testing templates: one YAML file per template, loaded and validated all at once.

A template file holds:

    name: "chat:llama"            # what routes refer to
    description: ...
    mode: messages | prompt       # the default enforcement mode
    system_prompt: "..." | null   # the safety prompt, first in every request
    user_wrapper: "Q: {content}"  # messages mode only: wraps each user turn; optional
    markers: ["### Response:"]    # this format's own turn markers, neutralized in client text
    stop: ["[INST]"]              # prompt mode: stop strings merged with the client's
    prompt: "{%- for m in messages -%}..."  # prompt mode: Jinja rendering the whole conversation

The Jinja sees `system` (the effective system text, or None) and `messages` (the turns after
the system message, each `{"role": "user" | "assistant", "content": str}`) and must render the
prompt up to and including the assistant's generation prompt. It runs in Jinja's immutable
sandbox, compiled once per prompt text. Client text reaches it only as data, never as template code.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import jinja2
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ptst.proxy.config import Mode, builtin_templates_dir

__all__ = [
    "Template",
    "TemplateError",
    "builtin_templates_dir",
    "load_template_file",
    "load_templates",
]

CONTENT = "{content}"
"""The placeholder for the user's text in `user_wrapper` (replaced once, never formatted)."""

TEMPLATE_SUFFIXES = (".yaml", ".yml")

# A conversation every prompt template must render: catches runtime Jinja errors at load time.
_SAMPLE: tuple[dict[str, str], ...] = (
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "second question"},
)


class TemplateError(Exception):
    """A template file that cannot be used; the message names the file and what is wrong."""


@functools.lru_cache(maxsize=1024)
def _compile(source: str) -> jinja2.Template:
    """Compile a prompt once (keyed by its text): rendering is on the request path."""
    environment = ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True
    )
    return environment.from_string(source)


class Template(BaseModel):
    """One safe-testing template. Immutable; the Jinja prompt is compiled on construction."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9:._-]*$", max_length=100)
    description: str = ""
    mode: Mode = "messages"
    system_prompt: str | None = Field(default=None, min_length=1)
    user_wrapper: str | None = None
    markers: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()
    prompt: str | None = Field(default=None, min_length=1)
    source: Path | None = Field(default=None, exclude=True, description="the file it came from")

    @model_validator(mode="after")
    def _check(self) -> Template:
        if self.user_wrapper is not None and self.user_wrapper.count(CONTENT) != 1:
            raise ValueError(f"user_wrapper must contain {CONTENT} exactly once")
        for marker in self.markers:
            if len(marker) < 2 or marker != marker.strip():
                raise ValueError(f"marker {marker!r}: needs 2+ characters and no outer spaces")
        if self.prompt is None:
            if self.mode == "prompt":
                raise ValueError("mode is prompt but the template has no prompt")
            return self
        try:
            _compile(self.prompt)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(
                f"prompt: Jinja syntax error on line {exc.lineno}: {exc.message}"
            ) from None
        return self

    @property
    def supports_prompt_mode(self) -> bool:
        return self.prompt is not None

    @property
    def wrapper_parts(self) -> tuple[str, str]:
        """(before, after) the user text in `user_wrapper`; ("", "") without a wrapper."""
        if self.user_wrapper is None:
            return "", ""
        before, after = self.user_wrapper.split(CONTENT)
        return before, after

    def render_prompt(self, system: str | None, messages: Sequence[Mapping[str, str]]) -> str:
        """Render the conversation (turns after the system message) to prompt-mode text."""
        if self.prompt is None:
            raise TemplateError(
                f"template {self.name!r} has no prompt: it cannot run in prompt mode"
            )
        return _compile(self.prompt).render(system=system, messages=list(messages))


def load_template_file(path: Path) -> Template:
    """Read, validate and compile one template file; errors name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"{path}: cannot read template: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TemplateError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: the top level must be a mapping of template fields")
    try:
        template = Template.model_validate({**data, "source": path})
    except ValidationError as exc:
        raise TemplateError(f"{path}: {_describe(exc)}") from None
    _smoke_test(template, path)
    return template


def load_templates(directory: Path) -> dict[str, Template]:
    """Load every *.yaml / *.yml file in `directory`: all valid, names unique, or TemplateError."""
    if not directory.is_dir():
        raise TemplateError(f"{directory}: templates directory does not exist")
    templates: dict[str, Template] = {}
    for path in sorted(p for p in directory.iterdir() if p.suffix in TEMPLATE_SUFFIXES):
        template = load_template_file(path)
        if template.name in templates:
            first = templates[template.name].source
            raise TemplateError(f"{path}: template name {template.name!r} is also used by {first}")
        templates[template.name] = template
    return templates


def _smoke_test(template: Template, path: Path) -> None:
    """Render a sample conversation with and without a system text; the prompt must show it."""
    if not template.supports_prompt_mode:
        return
    for system in (template.system_prompt, None, "client system"):
        for turns in (_SAMPLE[:1], _SAMPLE):
            try:
                rendered = template.render_prompt(system, turns)
            except Exception as exc:  # any Jinja runtime error: a bad file, not a crash
                raise TemplateError(
                    f"{path}: prompt fails to render a sample conversation: {exc}"
                ) from None
            if system is not None and system not in rendered:
                raise TemplateError(f"{path}: prompt does not render the system prompt")
            if any(turn["content"] not in rendered for turn in turns):
                raise TemplateError(f"{path}: prompt does not render every turn's content")


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {message}" if err["loc"] else message)
    return "; ".join(parts)
