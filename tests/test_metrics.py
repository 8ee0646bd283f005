"""Prometheus metrics: the series each event produces, bounded labels, exposition."""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from ptst.proxy.metrics import Metrics
from ptst.proxy.record import LogRecord

RECORD = LogRecord(
    request_id="req-1",
    time=1_700_000_000.0,
    route="demo",
    upstream_model="smollm2",
    template="chat:llama",
    mode="messages",
    stream=True,
    status=200,
    refusal=True,
    rule="keyword",
    score=None,
    latency_s=1.7,
    ttft_s=0.3,
    prompt_tokens=12,
    completion_tokens=30,
    prompt_sha256="00" * 32,
)


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_request_events_produce_the_expected_series() -> None:
    m = Metrics()
    m.on_request_start("demo")
    m.on_request_start("demo")
    assert value(m, "ptst_requests_in_flight", route="demo") == 2
    m.on_request_complete(RECORD)
    m.on_request_complete(
        dataclasses.replace(RECORD, refusal=False, status=502, ttft_s=None, completion_tokens=None)
    )

    assert value(m, "ptst_requests_in_flight", route="demo") == 0
    keys = {"route": "demo", "template": "chat:llama", "upstream_model": "smollm2"}
    assert value(m, "ptst_requests_total", **keys, status="200") == 1
    assert value(m, "ptst_requests_total", **keys, status="502") == 1
    assert value(m, "ptst_refusals_total", **keys) == 1
    assert value(m, "ptst_request_latency_seconds_count", route="demo") == 2
    assert value(m, "ptst_request_latency_seconds_sum", route="demo") == 3.4
    assert value(m, "ptst_request_latency_seconds_bucket", route="demo", le="2.5") == 2
    assert value(m, "ptst_request_latency_seconds_bucket", route="demo", le="1.0") == 0
    assert value(m, "ptst_time_to_first_token_seconds_count", route="demo") == 1
    assert value(m, "ptst_time_to_first_token_seconds_bucket", route="demo", le="0.01") == 0
    assert value(m, "ptst_time_to_first_token_seconds_bucket", route="demo", le="120.0") == 1
    assert value(m, "ptst_prompt_tokens_total", route="demo") == 24
    assert value(m, "ptst_completion_tokens_total", route="demo") == 30


def test_untemplated_route_is_labelled_none() -> None:
    m = Metrics()
    m.on_request_start("raw")
    m.on_request_complete(dataclasses.replace(RECORD, route="raw", template=None, refusal=None))
    labels = {"route": "raw", "template": "none", "upstream_model": "smollm2", "status": "200"}
    assert value(m, "ptst_requests_total", **labels) == 1
    assert (
        value(m, "ptst_refusals_total", route="raw", template="none", upstream_model="smollm2")
        is None
    )


def test_upstream_errors_log_drops_and_reloads() -> None:
    m = Metrics()
    assert value(m, "ptst_template_reload_ok") == 1  # loaded at start: no alert before a reload
    m.on_upstream_error("demo", "timeout")
    m.on_upstream_error("demo", "timeout")
    m.on_upstream_error("demo", "something new")
    m.on_log_dropped(reason="queue_full")
    m.on_log_dropped(reason="sink_error", n=7, sink="sqlite")
    m.on_log_written(sink="jsonl", n=3)
    m.on_template_reload(ok=True)
    m.on_template_reload(ok=False)

    assert value(m, "ptst_upstream_errors_total", route="demo", kind="timeout") == 2
    assert value(m, "ptst_upstream_errors_total", route="demo", kind="other") == 1
    assert value(m, "ptst_log_records_dropped_total", reason="queue_full", sink="all") == 1
    assert value(m, "ptst_log_records_dropped_total", reason="sink_error", sink="sqlite") == 7
    assert value(m, "ptst_log_records_written_total", sink="jsonl") == 3
    assert value(m, "ptst_template_reloads_total", result="ok") == 1
    assert value(m, "ptst_template_reloads_total", result="error") == 1
    assert value(m, "ptst_template_reload_ok") == 0


def test_label_values_are_capped() -> None:
    m = Metrics(max_label_values=2)
    for route in ("a", "b", "c", "d", "a"):
        m.on_request_start(route)
    assert value(m, "ptst_requests_in_flight", route="a") == 2
    assert value(m, "ptst_requests_in_flight", route="other") == 2
    assert value(m, "ptst_requests_in_flight", route="c") is None


def test_render_exposition_and_injected_registries() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    Metrics()  # a second instance on its own registry does not collide
    assert m.registry is registry
    m.on_request_start("demo")
    m.on_request_complete(RECORD)
    body, content_type = m.render()
    text = body.decode()
    assert content_type.startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    keys = (("route", "demo"), ("template", "chat:llama"), ("upstream_model", "smollm2"))
    assert samples[("ptst_requests_total", (*keys[:1], ("status", "200"), *keys[1:]))] == 1
    assert samples[("ptst_refusals_total", keys)] == 1
    assert samples[("ptst_requests_in_flight", (("route", "demo"),))] == 0
    assert all(name.startswith("ptst_") for name, _ in samples)
    assert "req-1" not in text and "00" * 32 not in text
