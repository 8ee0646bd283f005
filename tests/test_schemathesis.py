"""Schemathesis against a real `ptst serve` (issue 11, item 8): every operation of the proxy's
own OpenAPI document (/openapi.json, the generation endpoints included: proxy/openapi.py) gets
generated requests, valid and invalid, and the proxy never answers 5xx; every error body is the
OpenAI envelope {"error": {"message", "type", "param", "code"}}.

The proxy sits in front of the fast test responder (bench/responder.py), not vLLM. Generated
bodies name a random model, which is a 404; most of them are pointed at one of the configured
routes instead (picked from the body's checksum, so a failing case replays), so the rewrite, the
upstream hop and the answer relay all see generated input. Bounded: a fixed number of examples
per operation (about 30 s in all), each request with a timeout. What it found: a message or input
item whose role was an object or a list was a 500 (an unhashable value tested against a set of
roles in the rewrite); it is a 400 now.
"""

from __future__ import annotations

import json
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from ptst.proxy.app import create_app
from ptst.proxy.config import Settings, build_config
from tests.conftest import Proxy

KEY = "schemathesis-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 100  # per operation
TIMEOUT = 15.0


def routes(responder: str) -> list[dict[str, Any]]:
    return [
        {"model": "llama", "upstream": responder, "template": "chat:llama"},
        {"model": "chatml-prompt", "upstream": responder, "template": "chatml:llama", "mode": "prompt"},
        {"model": "alpaca-text", "upstream": responder, "template": "text:alpaca"},
        {
            "model": "strict",
            "upstream": responder,
            "template": "chatml:llama",
            "system_policy": "reject",
            "markers": "reject",
            "bypass_fields": "reject",
        },
        {"model": "echo", "upstream": responder, "upstream_model": "echo", "template": "chat:alpaca"},
        {"model": "raw", "upstream": responder},
    ]  # fmt: skip


MODELS = [r["model"] for r in routes("")]


@pytest.fixture(scope="module")
def proxy(start_proxy: Callable[..., Proxy], responder: str) -> Proxy:
    return start_proxy(routes(responder), api_keys=[KEY])


def origin(proxy: Proxy) -> str:
    return proxy.base_url.removesuffix("/v1")


def app_document() -> dict[str, Any]:
    """The app's OpenAPI document, built in this process (the test cases are made at collection,
    before any server runs; schemathesis's fixture-based loader does not run on pytest 9)."""
    route = {"model": "m", "upstream": "http://127.0.0.1:9/v1", "template": "chat:llama"}
    config = build_config([route], port=9, log_dir=Path(tempfile.gettempdir()))
    document: dict[str, Any] = create_app(Settings.model_validate(config)).openapi()
    return document


DOCUMENT = app_document()
schema = schemathesis.openapi.from_dict(DOCUMENT)
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES
)


def test_the_served_document_has_the_generation_endpoints(proxy: Proxy) -> None:
    document = requests.get(f"{origin(proxy)}/openapi.json", timeout=TIMEOUT).json()
    assert document == DOCUMENT  # what the cases below are generated from
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"]["$ref"].startswith("#/components/schemas/")
    chat = document["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["required"] == ["model", "messages"]
    assert "422" not in json.dumps(document["paths"])  # the app answers validation errors 400


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_no_server_error_and_every_error_is_openai_shaped(case: Any, proxy: Proxy) -> None:
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        pick = zlib.crc32(json.dumps(case.body, sort_keys=True, default=str).encode())
        if pick % 4:  # three in four: a served route
            case.body["model"] = MODELS[pick % len(MODELS)]
    response = case.call(base_url=origin(proxy), headers=AUTH, timeout=TIMEOUT)
    case.validate_response(response, checks=[not_a_server_error], headers=AUTH)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_openai_error(response)


def assert_openai_error(response: Any) -> None:
    headers = {k.lower(): v for k, v in response.headers.items()}  # schemathesis: name -> list
    assert headers["content-type"][0].startswith("application/json"), response.text
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
