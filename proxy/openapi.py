"""The proxy's OpenAPI document (`GET /openapi.json`), complete.

The three generation endpoints are plain Starlette routes (routes.py: FastAPI's per-request
machinery is measurable on that path), so FastAPI's own document leaves them out. `install`
replaces `app.openapi` with one that adds them, with their request bodies from schemas.py and
the OpenAI error envelope every error comes in, and answers FastAPI's 422 entries with the 400
the app really sends (`RequestValidationError` is rendered as 400). Built once, on the first
request for the document; nothing on the request path changes.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ptst.proxy.rewrite import ROLES
from ptst.proxy.schemas import ChatCompletionRequest, CompletionRequest, ResponsesRequest

__all__ = ["install", "openapi_document"]

REF = "#/components/schemas/{model}"

ERROR_RESPONSE: dict[str, Any] = {
    "type": "object",
    "title": "ErrorResponse",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

# What the rewrite reads of a chat message (rewrite.py checks it; unknown fields pass through).
MESSAGE: dict[str, Any] = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": sorted(ROLES)},
        "content": {
            "anyOf": [
                {"type": "string"},
                {"type": "null"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type"],
                        "properties": {"type": {"type": "string"}, "text": {"type": "string"}},
                    },
                },
            ]
        },
        "name": {"type": "string"},
    },
}

# (path, request model, operation id, summary)
GENERATION: tuple[tuple[str, type[BaseModel], str, str], ...] = (
    (
        "/v1/chat/completions",
        ChatCompletionRequest,
        "chat_completions",
        "Chat completion, with the route's safety template enforced",
    ),
    (
        "/v1/completions",
        CompletionRequest,
        "completions",
        "Raw completion (pass-through routes, or routes that allow raw prompts)",
    ),
    (
        "/v1/responses",
        ResponsesRequest,
        "responses",
        "Responses API, with the route's safety template enforced",
    ),
)

ERRORS = {
    "400": "Malformed request, or one the route's policy refuses",
    "401": "Missing or invalid API key",
    "403": "Forbidden by the route's policy (a raw prompt on an enforced route)",
    "404": "Unknown model",
    "413": "Body over the configured limit",
    "429": "The upstream's rate limit (its Retry-After passed back)",
    "502": "The upstream failed or answered garbage",
    "503": "No upstream reachable",
    "504": "The upstream did not answer in time",
}


def install(app: FastAPI) -> None:
    """Serve the complete document at the app's openapi_url."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def openapi_document(app: FastAPI) -> dict[str, Any]:
    document = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    _, top = models_json_schema(
        [(model, "validation") for _, model, _, _ in GENERATION], ref_template=REF
    )
    schemas.update(top.get("$defs", {}))
    schemas["ChatCompletionRequest"]["properties"]["messages"]["items"] = MESSAGE
    schemas["ErrorResponse"] = ERROR_RESPONSE
    for path, model, operation_id, summary in GENERATION:
        document["paths"][path] = {"post": _generation(model, operation_id, summary)}
    for item in document["paths"].values():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = _error(ERRORS["400"])
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return document


def _generation(model: type[BaseModel], operation_id: str, summary: str) -> dict[str, Any]:
    ref = {"$ref": REF.format(model=model.__name__)}
    return {
        "summary": summary,
        "operationId": operation_id,
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref}}},
        "responses": {
            "200": {
                "description": "The upstream's answer; with stream: true, server-sent events",
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            },
            **{status: _error(text) for status, text in ERRORS.items()},
        },
    }


def _error(description: str) -> dict[str, Any]:
    ref = {"$ref": REF.format(model="ErrorResponse")}
    return {"description": description, "content": {"application/json": {"schema": ref}}}
