"""Proxy settings: a YAML file validated with pydantic.

server: {host: 127.0.0.1, port: 8080, timeouts: {first_byte: 600}, cooldown_s: 5}
api_keys: [...]          # or env PTST_API_KEYS (comma separated); none = open
templates_dir: templates # default: the shipped templates; relative paths resolve against
                         # the config file's folder
routes:
  - model: demo
    upstream: http://127.0.0.1:8000/v1   # or a list of replicas
    upstream_model: smollm2
    template: chat:llama
    mode: messages                        # or prompt; default: the template's own
    system_policy: prepend                # prepend | replace | reject
    trained_with: chat:vanilla
    api_key_env: VLLM_API_KEY             # or api_key: ...; sent upstream as a bearer token
    timeouts: {between_chunks: 60}        # over the server's timeouts, field by field
log: {jsonl: ptst-logs/refusals.jsonl, sqlite: ptst-logs/refusals.sqlite3, log_text: false}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

Mode = Literal["messages", "prompt"]
SystemPolicy = Literal["prepend", "replace", "reject"]
MarkerPolicy = Literal["neutralize", "reject"]
BypassPolicy = Literal["strip", "reject"]


def builtin_templates_dir() -> Path:
    """The shipped templates: `ptst/templates/` installed, the repository's `templates/` in a
    checkout (`ptst/` links there, and resolving this file leaves the link)."""
    return Path(__file__).resolve().parent.parent / "templates"


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    """Seconds the proxy waits on an upstream, phase by phase (None: no limit)."""

    connect: float = Field(default=5.0, gt=0, description="open a new TCP (and TLS) connection")
    pool: float = Field(
        default=30.0, gt=0, description="wait for a free connection when the pool is full"
    )
    first_byte: float = Field(
        default=600.0,
        gt=0,
        description="from sending the request to the answer's head: for a non-streamed answer "
        "this is the whole generation",
    )
    between_chunks: float = Field(
        default=600.0, gt=0, description="the longest silence while the answer's body arrives"
    )
    total: float | None = Field(
        default=None, gt=0, description="the whole exchange, streams included"
    )


class ServerSettings(_Strict):
    host: str = Field(
        default="127.0.0.1", description="loopback by default; 0.0.0.0 for every interface"
    )
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    metrics_public: bool = Field(
        default=False,
        description="serve /metrics without an API key even when api_keys are set (for a "
        "Prometheus scraper on a private network); /admin/* always needs a key",
    )
    cors_allow_origins: list[str] = Field(
        default_factory=list,
        description="browser origins allowed to call the proxy (CORS), e.g. "
        "https://app.example.com, or '*'; none (the default) = no CORS headers at all",
    )
    shutdown_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="on SIGTERM, how long requests in flight may still run; then streams end "
        "with an error event and [DONE], and the log is flushed",
    )
    timeouts: Timeouts = Field(
        default_factory=Timeouts, description="every route's, unless the route sets its own"
    )
    max_connections: int = Field(
        default=1000, gt=0, description="upstream connections open at once, all hosts"
    )
    max_connections_per_host: int = Field(
        default=0, ge=0, description="upstream connections open at once to one host (0: no cap)"
    )
    cooldown_s: float = Field(
        default=5.0,
        ge=0,
        description="a replica that failed (refused, timed out, 5xx) is tried last for this long",
    )


class LogSettings(_Strict):
    jsonl: Path | None = Path("ptst-logs/refusals.jsonl")
    sqlite: Path | None = Path("ptst-logs/refusals.sqlite3")
    log_text: bool = False
    queue_size: int = Field(default=10_000, gt=0)
    rotate_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    rotate_keep: int = Field(default=5, ge=1)
    second_stage: bool = Field(
        default=False,
        description="judge answers the rules are unsure about with the second-stage classifier "
        "(needs the 'detect' extra) before they are counted and logged; the answer itself is "
        "never delayed. Read at start only.",
    )
    second_stage_weights: Path | None = Field(
        default=None, description="the classifier's weights (default: the shipped ones)"
    )


class Route(_Strict):
    model: str = Field(min_length=1)
    upstream: list[str]
    upstream_model: str | None = None
    template: str | None = Field(
        default=None, description="None = pass-through: no template enforced (raw prompts allowed)"
    )
    mode: Mode | None = None
    system_policy: SystemPolicy = "prepend"
    markers: MarkerPolicy = "neutralize"
    bypass_fields: BypassPolicy = "strip"
    trained_with: str | None = None
    allow_same_template: bool = False
    allow_raw_prompts: bool = False
    extra_markers: list[str] = Field(default_factory=list)
    tokenizer: Path | None = Field(
        default=None,
        description="a Hugging Face model or tokenizer folder: its special tokens are treated "
        "like role markers in client content",
    )
    api_key: SecretStr | None = Field(
        default=None, description="sent to the upstream as `Authorization: Bearer <key>`"
    )
    api_key_env: str | None = Field(
        default=None, description="the environment variable that holds api_key (read at load)"
    )
    timeouts: Timeouts | None = Field(
        default=None, description="this route's timeouts; unset fields take the server's"
    )

    @field_validator("upstream", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("upstream")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one upstream URL is required")
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(
                    f"upstream {url!r} must be an http(s) URL such as http://127.0.0.1:8000/v1"
                )
        return [url.rstrip("/") for url in value]

    @model_validator(mode="after")
    def _key_from_env(self) -> Route:
        if self.api_key_env is None:
            return self
        if self.api_key is not None:
            raise ValueError(f"route {self.model!r} sets both api_key and api_key_env: pick one")
        value = os.environ.get(self.api_key_env)
        if not value:
            raise ValueError(
                f"route {self.model!r}: environment variable {self.api_key_env!r} "
                "(api_key_env) is not set"
            )
        object.__setattr__(self, "api_key", SecretStr(value))  # the model is frozen
        return self

    @model_validator(mode="after")
    def _ptst_guard(self) -> Route:
        if (
            self.template is not None
            and self.trained_with == self.template
            and not self.allow_same_template
        ):
            raise ValueError(
                f"route {self.model!r} serves template {self.template!r}, the same template its "
                "checkpoint was trained with (trained_with). Fine-tuning and serving with the same "
                "template is the setting in which PTST (Lyu et al. 2024) measured the largest loss "
                "of safety; serve with a safety template the model was not trained with, or set "
                "allow_same_template: true to accept the risk."
            )
        return self

    @property
    def enforced(self) -> bool:
        return self.template is not None

    @property
    def upstream_name(self) -> str:
        return self.upstream_model or self.model


class Settings(_Strict):
    server: ServerSettings = ServerSettings()
    api_keys: list[str] = Field(
        default_factory=list,
        repr=False,  # a settings object in a log line or a traceback shows no key
        description="clients send one as `Authorization: Bearer <key>`; none = open. They "
        "guard the API, /admin/* and /metrics (see server.metrics_public)",
    )
    templates_dir: Path = Field(
        default_factory=builtin_templates_dir,
        description="the template files; default: the templates shipped with ptst",
    )
    # Seconds between checks of the config and template files; 0 turns the file watch off
    # (SIGHUP and POST /admin/reload still reload).
    reload_interval_s: float = Field(default=0.5, ge=0)
    routes: list[Route] = Field(default_factory=list)
    log: LogSettings = LogSettings()
    source: Path | None = Field(default=None, exclude=True, description="the file it came from")

    @model_validator(mode="after")
    def _unique_models(self) -> Settings:
        seen: set[str] = set()
        for route in self.routes:
            if route.model in seen:
                raise ValueError(f"two routes are named {route.model!r}")
            seen.add(route.model)
        return self

    @model_validator(mode="after")
    def _route_timeouts(self) -> Settings:
        """Each route's timeouts in full: the fields it sets over the server's."""
        server = self.server.timeouts
        routes = []
        for route in self.routes:
            own = route.timeouts
            merged = (
                server.model_copy(update={k: getattr(own, k) for k in own.model_fields_set})
                if own
                else server
            )
            routes.append(route.model_copy(update={"timeouts": merged}))
        object.__setattr__(self, "routes", routes)  # the model is frozen
        return self

    def route(self, model: str) -> Route | None:
        for route in self.routes:
            if route.model == model:
                return route
        return None


def parse_settings(data: dict[str, Any], source: Path | None = None) -> Settings:
    """Validate a config mapping; relative paths resolve against the source file's folder."""
    data = dict(data)
    env_keys = os.environ.get("PTST_API_KEYS")
    if env_keys and not data.get("api_keys"):
        data["api_keys"] = [k.strip() for k in env_keys.split(",") if k.strip()]
    where = str(source) if source else "config"
    try:
        settings = Settings.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_describe(exc)}") from None
    if source is None:
        return settings
    base = source.resolve().parent
    routes = [
        r.model_copy(update={"tokenizer": _resolve(base, r.tokenizer)}) for r in settings.routes
    ]
    log = settings.log.model_copy(
        update={
            "jsonl": _resolve(base, settings.log.jsonl),
            "sqlite": _resolve(base, settings.log.sqlite),
        }
    )
    return settings.model_copy(
        update={
            "templates_dir": _resolve(base, settings.templates_dir),
            "routes": routes,
            "log": log,
        }
    )


def load_settings(path: Path) -> Settings:
    """Read and validate a YAML config file; errors name the file and the offending key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return parse_settings(data, source=path)


def _resolve(base: Path, path: Path | None) -> Path | None:
    if path is None:
        return None
    path = path.expanduser()
    return path if path.is_absolute() else base / path


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def build_config(
    routes: list[dict[str, Any]],
    *,
    port: int,
    log_dir: Path,
    templates_dir: Path | None = None,
    host: str = "127.0.0.1",
    **extra: Any,
) -> dict[str, Any]:
    """A config as `ptst serve --config` reads it: these routes, these templates (default: the
    shipped ones), and both refusal-log sinks in `log_dir`. Each `extra` top-level key is merged in (a dict key by key).
    `ptst up`, the benches and the tests all build their configs here."""
    config: dict[str, Any] = {
        "server": {"host": host, "port": port},
        "templates_dir": str((templates_dir or builtin_templates_dir()).resolve()),
        "routes": routes,
        "log": {
            "jsonl": str((log_dir / "refusals.jsonl").resolve()),
            "sqlite": str((log_dir / "refusals.sqlite3").resolve()),
        },
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write a config atomically (a running proxy's file watch never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(path)
    return path
