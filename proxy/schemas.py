"""The slice of the OpenAI API the proxy reads. Unknown fields are allowed and pass through."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(OpenAIModel):
    include_usage: bool | None = None


class ChatCompletionRequest(OpenAIModel):
    model: str
    # Each message is checked by the rewrite (roles, content shapes) or by the upstream.
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class CompletionRequest(OpenAIModel):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class ResponsesRequest(OpenAIModel):
    model: str
    # Items are checked by the rewrite (roles, content shapes) or by the upstream.
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    stream: bool | None = False
