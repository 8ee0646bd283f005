"""Session fixtures: a real vLLM CPU server with the demo model, the fast test responder, and
proxies started as real `ptst serve` processes. All bind 127.0.0.1 on free ports.

In CI (CI=true) a backend that cannot start fails the run; elsewhere it skips the tests that
need it. PTST_TEST_VLLM_URL=http://127.0.0.1:PORT/v1 reuses a running vLLM (served name
`smollm2`) instead of starting one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ptst.bench import procs
from ptst.bench.responder import FAULT_MODELS
from ptst.proxy.config import build_config, write_config
from tests.servers import PTST, Child, free_port, start_server

IN_CI = os.environ.get("CI", "").lower() == "true"
VLLM_MODEL = "smollm2"


def backend_missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"a vLLM backend is required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def vllm_url(log_dir: Path) -> Iterator[str]:
    reuse = os.environ.get("PTST_TEST_VLLM_URL")
    if reuse:
        yield reuse.rstrip("/")
        return
    try:
        import vllm  # noqa: F401

        from ptst.engine.demo_model import ensure_model

        model = ensure_model()
    except Exception as exc:  # ImportError, DemoModelError, pip failures
        backend_missing(f"cannot prepare vLLM with the demo model: {exc}")
    port = free_port()
    server = start_server(
        "vllm",
        [
            *PTST,
            "backend",
            "--model",
            str(model),
            "--served-model-name",
            VLLM_MODEL,
            "--port",
            str(port),
            "--max-model-len",
            "2048",
            # adapters trained by the tests are loaded while it runs (tests/test_tune_e2e.py)
            "--runtime-lora",
            "--max-loras",
            "2",
        ],
        log_dir,
        # the Responses API keeps responses only with it: previous_response_id (test_responses.py)
        env={"VLLM_ENABLE_RESPONSES_API_STORE": "1"},
    )
    try:
        server.wait_line(timeout=900)
    except RuntimeError as exc:
        server.stop()
        backend_missing(str(exc))
    yield f"http://127.0.0.1:{port}/v1"
    server.stop()


@pytest.fixture(scope="session")
def responder_url(log_dir: Path) -> Iterator[str]:
    port = free_port()
    server = start_server(
        "responder", [sys.executable, "-m", "ptst.bench.responder", "--port", str(port)], log_dir
    )
    server.wait_line(timeout=60)
    yield f"http://127.0.0.1:{port}/v1"
    server.stop()


@pytest.fixture(scope="module")
def responder() -> Iterator[str]:
    """A responder of the module's own (8 tokens per answer), for tests that count requests."""
    with procs.responder(tokens=8) as url:
        yield url


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples named `name` that carry these labels (0 if none)."""
    return sum(
        float(s.value) for s in samples if s.name == name and labels.items() <= s.labels.items()
    )


class Proxy:
    def __init__(self, server: Child, base_url: str, config_path: Path, config: dict[str, Any]):
        self.server, self.base_url, self.config_path, self.config = (
            server,
            base_url,
            config_path,
            config,
        )

    def client(self, api_key: str = "none", **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **kwargs)

    def write_config(self, config: dict[str, Any]) -> None:
        self.config = config
        write_config(self.config_path, config)

    def scrape(self) -> list[Sample]:
        """One `/metrics` scrape, on a connection of its own, as its samples."""
        url = self.base_url.removesuffix("/v1") + "/metrics"
        reply = httpx.get(url, headers={"authorization": "Bearer none"}, timeout=10)
        assert reply.status_code == 200, reply.text
        return [s for family in text_string_to_metric_families(reply.text) for s in family.samples]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` on `/metrics` that carry these labels (0 if none)."""
        return total(self.scrape(), name, **labels)

    def log_records(self, request_id: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The refusal-log records of one request, once its first one is in the JSONL file."""
        jsonl = Path(self.config["log"]["jsonl"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if jsonl.exists() and request_id in jsonl.read_text():
                break
            time.sleep(0.1)
        lines = jsonl.read_text().splitlines() if jsonl.exists() else []
        return [r for r in map(json.loads, lines) if r["request_id"] == request_id]


def write_proxy_config(
    folder: Path, routes: list[dict[str, Any]], **extra: Any
) -> tuple[Path, dict[str, Any]]:
    config = build_config(routes, port=free_port(), log_dir=folder, **extra)
    return write_config(folder / "ptst.yaml", config), config


@pytest.fixture(scope="session")
def start_proxy(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path
) -> Iterator[Callable[..., Proxy]]:
    started: list[Child] = []

    def start(
        routes: list[dict[str, Any]], timeout: float = 60, workers: int = 1, **extra: Any
    ) -> Proxy:
        folder = tmp_path_factory.mktemp("proxy")
        path, config = write_proxy_config(folder, routes, **extra)
        port = config["server"]["port"]
        cmd = [*PTST, "serve", "--config", str(path), "--workers", str(workers)]
        server = start_server(f"proxy-{port}", cmd, log_dir)
        started.append(server)
        server.wait_http(f"http://127.0.0.1:{port}/v1/models", timeout=timeout)
        deadline = time.monotonic() + timeout
        while sum("startup complete" in line for line in list(server.lines)) < workers:
            if time.monotonic() > deadline or server.poll() is not None:
                raise server.failure(f"did not start {workers} workers")
            time.sleep(0.1)
        return Proxy(server, f"http://127.0.0.1:{port}/v1", path, config)

    yield start
    for server in started:
        server.stop()


def responder_routes(responder_url: str) -> list[dict[str, Any]]:
    """One enforced route per responder behaviour, named `fake-<behaviour>`."""
    return [
        {
            "model": f"fake-{name}",
            "upstream": responder_url,
            "upstream_model": name,
            "template": "chat:llama",
        }
        for name in FAULT_MODELS
    ]


@pytest.fixture(scope="session")
def demo_proxy(start_proxy: Callable[..., Proxy], vllm_url: str, responder_url: str) -> Proxy:
    routes = [
        {
            "model": "demo",
            "upstream": vllm_url,
            "upstream_model": VLLM_MODEL,
            "template": "chat:llama",
            "trained_with": "chat:vanilla",
        },
        {
            "model": "demo-prompt",
            "upstream": vllm_url,
            "upstream_model": VLLM_MODEL,
            "template": "chatml:llama",
            "mode": "prompt",
        },
        {"model": "demo-raw", "upstream": vllm_url, "upstream_model": VLLM_MODEL},
        *responder_routes(responder_url),
    ]
    return start_proxy(routes)
