"""All Prometheus metrics of the proxy, on one injected registry, fed by event-named hooks.

    ptst_requests_in_flight{route}                               gauge
    ptst_requests_total{route,template,upstream_model,status}    counter
    ptst_refusals_total{route,template,upstream_model}           counter
    ptst_time_to_first_token_seconds{route}                      histogram
    ptst_request_latency_seconds{route}                          histogram (end to end)
    ptst_prompt_tokens_total{route}, ptst_completion_tokens_total{route}
    ptst_upstream_errors_total{route,kind}                       counter
    ptst_rejected_requests_total{endpoint,status,code}           counter (turned away before
                                                                 a route: key, body, model, policy)
    ptst_log_records_written_total{sink}                         counter
    ptst_log_records_dropped_total{reason,sink}                  counter
    ptst_template_reloads_total{result}                          counter
    ptst_template_reload_ok                                      gauge (1 = last reload, or start, succeeded)
    ptst_second_stage_total{route,outcome}                       counter (confirmed, overturned,
                                                                 skipped: backlog full)

With several workers (`ptst serve --workers N`) the values live in prometheus_client's
multiprocess files (proxy/workers.py) and `render` sums every worker's, live or exited; the
in-flight gauge counts live workers only, the reload gauge is the lowest of the live workers.

Label values come from configuration (route, template, upstream model) or small fixed sets;
each label still keeps at most `max_label_values` distinct values, later ones become "other",
so a misbehaving caller cannot blow up the series count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from ptst.proxy.record import LogRecord

# LLM latencies: 10 ms (a cached first token) to 120 s (a long generation).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
UPSTREAM_ERROR_KINDS = frozenset({"connect", "timeout", "status", "protocol", "cancelled"})
OTHER = "other"


class _LabelGuard:
    """Caps the distinct values of each label; values past the cap map to "other"."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: dict[str, set[str]] = {}

    def __call__(self, label: str, value: str | None) -> str:
        text = "none" if value is None else value
        seen = self._seen.setdefault(label, set())
        if text in seen:
            return text
        if len(seen) >= self._limit:
            return OTHER
        seen.add(text)
        return text


class Metrics:
    """The proxy's metrics; one instance per app, on its own registry unless one is given.
    `multiprocess_dir`: the folder of prometheus_client's multiprocess files, when this process
    is one of several workers (PROMETHEUS_MULTIPROC_DIR was set before prometheus_client was
    imported); scrapes then read every worker's files."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        max_label_values: int = 200,
        multiprocess_dir: Path | None = None,
    ):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir
        self._label = _LabelGuard(max_label_values)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.in_flight = Gauge(
            "ptst_requests_in_flight",
            "Requests being served.",
            ["route"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.requests = Counter(
            "ptst_requests",
            "Completed requests.",
            ["route", "template", "upstream_model", "status"],
            registry=r,
        )
        self.refusals = Counter(
            "ptst_refusals",
            "Completed requests whose answer the detector judged a refusal.",
            ["route", "template", "upstream_model"],
            registry=r,
        )
        self.ttft = Histogram(
            "ptst_time_to_first_token_seconds",
            "Time from request start to the first content token.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "ptst_request_latency_seconds",
            "End-to-end request latency.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "ptst_prompt_tokens", "Prompt tokens reported by the upstream.", ["route"], registry=r
        )
        self.completion_tokens = Counter(
            "ptst_completion_tokens",
            "Completion tokens reported by the upstream.",
            ["route"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "ptst_upstream_errors",
            "Upstream failures by kind: connect, timeout, status (an error status answered), "
            "protocol (a cut or malformed answer), cancelled.",
            ["route", "kind"],
            registry=r,
        )
        self.rejected = Counter(
            "ptst_rejected_requests",
            "Requests answered with an error before reaching an upstream (API key, body, "
            "schema, unknown model or path, template policy), by endpoint, status and code.",
            ["endpoint", "status", "code"],
            registry=r,
        )
        self.log_written = Counter(
            "ptst_log_records_written",
            "Refusal-log records written, per sink.",
            ["sink"],
            registry=r,
        )
        self.log_dropped = Counter(
            "ptst_log_records_dropped",
            "Refusal-log records lost (queue_full, sink_error, shutdown, closed), per sink.",
            ["reason", "sink"],
            registry=r,
        )
        self.template_reloads = Counter(
            "ptst_template_reloads", "Template reloads by result.", ["result"], registry=r
        )
        self.second_stage = Counter(
            "ptst_second_stage",
            "Answers the refusal detector's second stage was asked about, by outcome: "
            "confirmed or overturned the rules' verdict, or skipped (backlog full).",
            ["route", "outcome"],
            registry=r,
        )
        self.template_reload_ok = Gauge(
            "ptst_template_reload_ok",
            "1 if the last template reload succeeded, or none has run since the templates "
            "loaded at start (in every live worker).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.template_reload_ok.set(1)  # the process started, so its templates loaded

    def _child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, cached: the lookup is measurable on the request path."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def on_request_start(self, route: str) -> None:
        self._child(self.in_flight, self._label("route", route)).inc()

    def on_request_complete(self, record: LogRecord, verdict_final: bool = True) -> None:
        """Count a finished request; pairs with one earlier `on_request_start(record.route)`.
        With `verdict_final=False` the refusal is counted later, by `on_second_stage`."""
        route = self._label("route", record.route)
        template = self._label("template", record.template)
        model = self._label("upstream_model", record.upstream_model)
        self._child(self.in_flight, route).dec()
        self._child(self.requests, route, template, model, str(record.status)).inc()
        if verdict_final:
            self._count_refusal(record)
        self._child(self.latency, route).observe(record.latency_s)
        if record.ttft_s is not None:
            self._child(self.ttft, route).observe(record.ttft_s)
        if record.prompt_tokens:
            self._child(self.prompt_tokens, route).inc(record.prompt_tokens)
        if record.completion_tokens:
            self._child(self.completion_tokens, route).inc(record.completion_tokens)

    def on_second_stage(self, rules: LogRecord, final: LogRecord | None) -> None:
        """The second stage's verdict on a request counted with `verdict_final=False`;
        `final` is None when the backlog was full and the rules' verdict stands."""
        route = self._label("route", rules.route)
        if final is None:
            outcome, final = "skipped", rules
        else:
            outcome = "confirmed" if final.refusal == rules.refusal else "overturned"
        self._child(self.second_stage, route, outcome).inc()
        self._count_refusal(final)

    def _count_refusal(self, record: LogRecord) -> None:
        if record.refusal:
            route = self._label("route", record.route)
            template = self._label("template", record.template)
            model = self._label("upstream_model", record.upstream_model)
            self._child(self.refusals, route, template, model).inc()

    def on_upstream_error(self, route: str, kind: str) -> None:
        kind = kind if kind in UPSTREAM_ERROR_KINDS else OTHER
        self.upstream_errors.labels(self._label("route", route), kind).inc()

    def on_rejected(self, endpoint: str, status: int, code: str | None) -> None:
        label = self._label
        self.rejected.labels(label("endpoint", endpoint), str(status), label("code", code)).inc()

    def on_log_written(self, sink: str, n: int = 1) -> None:
        self.log_written.labels(self._label("sink", sink)).inc(n)

    def on_log_dropped(self, reason: str, n: int = 1, sink: str = "all") -> None:
        """Count `n` lost records; `sink="all"` when no sink got them (e.g. queue full)."""
        if n > 0:
            self.log_dropped.labels(self._label("reason", reason), self._label("sink", sink)).inc(n)

    def on_template_reload(self, ok: bool) -> None:
        self.template_reloads.labels("ok" if ok else "error").inc()
        self.template_reload_ok.set(1 if ok else 0)

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type, for `GET /metrics`."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()  # read anew each scrape, as prometheus_client documents
        MultiProcessCollector(registry, path=str(self.multiprocess_dir))
        return generate_latest(registry), CONTENT_TYPE_LATEST
