"""Template enforcement: rewrite a chat request so that the client cannot undo the template.

    enforce_chat(body, template, policy)    messages mode: a body for upstream /chat/completions
    enforce_prompt(body, template, policy)  prompt mode: a body for upstream /completions
    enforce(body, template, policy, mode)   either, with the upstream path to send it to

Pure functions of (request body, template, policy); they never change their input and raise
`proxy.errors.BadRequest` (400, with `param`) for requests the policy refuses.

What a client cannot do on an enforced route:
- move or drop the safety prompt: the result has one system message (or system block), first,
  starting with the template's system prompt; client system/developer messages follow it
  (`prepend`), are dropped (`replace`) or answered with 400 (`reject`);
- open a turn from inside its text: role markers and special tokens (`<|im_start|>`, `[INST]`,
  `<<SYS>>`, `<|start_header_id|>`, ...) found case-insensitively in any client string that a
  chat template may render (content, names, tool calls, tool definitions; object keys too, and
  the JSON that tool-call `arguments` strings decode to, since vLLM decodes them and templates
  render them with `tojson`) are neutralized by
  inserting one space after their first character (`<|im_start|>` -> `< |im_start|>`,
  `[INST]` -> `[ INST]`, `</s>` -> `< /s>`), which no tokenizer reads as the special token
  and which stays visible in logs; or answered with 400 naming the marker (`reject`);
- swap the chat template: vLLM fields that change how the prompt is built (`BYPASS_FIELDS`)
  are stripped, or answered with 400 when set to a non-default value (`reject`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from ptst.proxy.config import BypassPolicy, MarkerPolicy, Mode, Route, SystemPolicy
from ptst.proxy.errors import BadRequest
from ptst.proxy.templates import Template

# Fields of vLLM's chat/completions requests that change which prompt the model sees.
BYPASS_FIELDS: tuple[str, ...] = (
    "chat_template",  # a client-supplied Jinja chat template
    "chat_template_kwargs",  # template switches (e.g. drop the default system prompt)
    "continue_final_message",  # prefill: continue a client-written assistant turn
    "add_generation_prompt",  # render without the assistant header
    "echo",  # chat: merge into the client's last turn; completions: return the prompt
    "prompt",  # a raw prompt
    "prompt_embeds",  # a raw prompt as embeddings
    "suffix",  # completions: text after the generation point
    "add_special_tokens",  # extra BOS/EOS around the rendered prompt
    "documents",  # RAG documents the chat template renders unchecked
    "truncate_prompt_tokens",  # keeps the last N tokens: cuts the system prompt off
    "truncation_side",
)

# Role markers and special tokens of the formats served today (matched case-insensitively).
ROLE_MARKERS: tuple[str, ...] = (
    # Llama-2 and Mistral
    "[INST]",
    "[/INST]",
    "<<SYS>>",
    "<</SYS>>",
    "<s>",
    "</s>",
    "<unk>",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_CALLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CONTENT]",
    "[THINK]",
    "[/THINK]",
    "[ARGS]",
    "[CALL_ID]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
    # Gemma
    "<start_of_turn>",
    "<end_of_turn>",
    "<bos>",
    "<eos>",
    # Qwen / Hermes tool turns
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)
# Whole families: ChatML, Llama-3, Phi, GPT (`<|im_start|>`, `<|eot_id|>`, `<|endoftext|>`,
# `<|reserved_special_token_7|>`, ...) and DeepSeek's full-width `<｜begin▁of▁sentence｜>`.
_MARKER_FAMILIES = (r"<\|[^\s|<>]{1,64}\|>", r"<｜[^\s｜]{1,64}｜>")
_MAX_PASSES = 8

# Keys whose values are not text a chat template renders (or are ours to keep), skipped only
# where they have that meaning: in a message or input item and in its content parts. Anywhere
# else (tool definitions, tool-call arguments) every key and value may reach the prompt through
# a template's `tojson`.
_PART_KEYS = frozenset(
    {"type", "image_url", "input_audio", "audio_url", "video_url", "file", "image_embeds"}
)
_NOT_TEXT = _PART_KEYS | {"role"}
EVERY_KEY: frozenset[str] = frozenset()
# Tool-call arguments: a JSON string that vLLM decodes (escapes and all) before the template
# renders it, so `"\u003c|im_start|>"` is a marker once decoded.
_JSON_TEXT = "arguments"
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Content parts vLLM reads as text, whatever the API they came from (chat or Responses).
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
SYSTEM_ROLES = frozenset({"system", "developer"})

# Chat-only fields with no meaning for /completions in prompt mode (tools handled apart).
_CHAT_ONLY = (
    "reasoning_effort",
    "include_reasoning",
    "thinking_token_budget",
    "parallel_tool_calls",
    "mm_processor_kwargs",
    "media_io_kwargs",
    "modalities",
    "audio",
)

Message = dict[str, Any]


@dataclass(frozen=True)
class Policy:
    """How a route treats client system messages, role markers and template-bypass fields."""

    system: SystemPolicy = "prepend"
    markers: MarkerPolicy = "neutralize"
    bypass: BypassPolicy = "strip"
    extra_markers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for marker in self.extra_markers:
            if len(marker) < 2 or marker != marker.strip():
                raise ValueError(f"extra marker {marker!r}: needs 2+ characters, no outer spaces")

    @classmethod
    def from_route(cls, route: Route) -> Policy:
        return cls(
            system=route.system_policy,
            markers=route.markers,
            bypass=route.bypass_fields,
            extra_markers=tuple(route.extra_markers),
        )


def enforce(
    body: dict[str, Any], template: Template, policy: Policy, mode: Mode | None = None
) -> tuple[Literal["/chat/completions", "/completions"], dict[str, Any]]:
    """Rewrite `body` in `mode` (default: the template's); returns (upstream path, new body)."""
    if (mode or template.mode) == "prompt":
        return "/completions", enforce_prompt(body, template, policy)
    return "/chat/completions", enforce_chat(body, template, policy)


def enforce_chat(body: dict[str, Any], template: Template, policy: Policy) -> dict[str, Any]:
    """Messages mode: one system message first with the safety prompt, client text defused."""
    messages = _checked_messages(body)
    out = without_bypass_fields(body, policy)
    pattern = marker_pattern(template.markers + policy.extra_markers)
    system = _system_text(messages, template, policy, pattern)
    rewritten: list[Message] = [] if system is None else [{"role": "system", "content": system}]
    for index, message in enumerate(messages):
        if message["role"] in SYSTEM_ROLES:
            continue
        cleaned = _clean_message(message, f"messages[{index}]", pattern, policy)
        if cleaned["role"] == "user":
            cleaned["content"] = wrap(cleaned.get("content"), template)
        rewritten.append(cleaned)
    out["messages"] = rewritten
    if isinstance(out.get("tools"), list):
        out["tools"] = clean(out["tools"], "tools", pattern, policy, EVERY_KEY)
    return out


def enforce_prompt(body: dict[str, Any], template: Template, policy: Policy) -> dict[str, Any]:
    """Prompt mode: the whole conversation rendered by the template's Jinja, for /completions."""
    messages = _checked_messages(body)
    out = without_bypass_fields(body, policy)
    pattern = marker_pattern(template.markers + policy.extra_markers)
    system = _system_text(messages, template, policy, pattern)
    turns: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        role = message["role"]
        if role in SYSTEM_ROLES:
            continue
        path = f"messages[{index}]"
        if role not in ("user", "assistant") or message.get("tool_calls"):
            raise BadRequest(
                f"{path}: prompt-mode template {template.name!r} renders only user and "
                "assistant text turns (no tool calls or tool results)",
                param=f"{path}.role",
            )
        text = plain_text(message.get("content"), f"{path}.content")
        turns.append({"role": role, "content": defuse(text, f"{path}.content", pattern, policy)})
    _check_alternation(turns)
    out.pop("messages", None)
    out["prompt"] = template.render_prompt(system, turns)
    _map_chat_fields(out, template)
    return out


@functools.lru_cache(maxsize=256)
def marker_pattern(extra: tuple[str, ...] = ()) -> re.Pattern[str]:
    """One compiled, case-insensitive regex for the role markers plus `extra` literal markers."""
    literals = {marker.casefold(): marker for marker in (*ROLE_MARKERS, *extra)}
    escaped = [re.escape(m) for m in sorted(literals.values(), key=len, reverse=True)]
    return re.compile("|".join([*_MARKER_FAMILIES, *escaped]), re.IGNORECASE)


def neutralize(text: str, pattern: re.Pattern[str]) -> str:
    """Insert a space after the first character of every marker, until none is left."""
    for _ in range(_MAX_PASSES):
        text, count = pattern.subn(_break_marker, text)
        if count == 0:
            return text
    raise BadRequest("message content keeps re-forming role markers after neutralization")


def _break_marker(match: re.Match[str]) -> str:
    marker = match.group(0)
    return marker[0] + " " + marker[1:]


def defuse(text: str, path: str, pattern: re.Pattern[str], policy: Policy) -> str:
    if policy.markers == "reject":
        match = pattern.search(text)
        if match is not None:
            raise BadRequest(
                f"{path} contains the role marker or special token {match.group(0)!r}, "
                "which this route does not accept in message content",
                param=path,
            )
        return text
    return neutralize(text, pattern)


def clean(
    value: Any,
    path: str,
    pattern: re.Pattern[str],
    policy: Policy,
    skip: frozenset[str] = _NOT_TEXT,
) -> Any:
    """Defuse every string a chat template may render, keys included, keeping the structure.

    `skip` names the keys of this level whose values are not rendered text: `_NOT_TEXT` for a
    message or input item, `_PART_KEYS` for its content parts; below them every key and value
    is defused."""
    if isinstance(value, str):
        return defuse(value, path, pattern, policy)
    if isinstance(value, list):
        return [clean(item, f"{path}[{i}]", pattern, policy, skip) for i, item in enumerate(value)]
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if key in skip:
                out[key] = item
                continue
            where = f"{path}.{key}"
            # a message's or item's content parts; a "content" key anywhere else is just a key
            inner = _PART_KEYS if key == "content" and skip is _NOT_TEXT else EVERY_KEY
            cleaned = clean(item, where, pattern, policy, inner)
            if key == _JSON_TEXT and isinstance(cleaned, str):
                cleaned = _clean_json_text(cleaned, where, pattern, policy)
            new_key = defuse(key, where, pattern, policy) if isinstance(key, str) else key
            out[new_key] = cleaned
        return out
    return value


def _clean_json_text(text: str, path: str, pattern: re.Pattern[str], policy: Policy) -> str:
    """A JSON string as the template will see it once decoded: re-encoded when its decoded keys
    or values held a marker (an escape such as `\\u007c` hides one from the raw text)."""
    if "\\" not in text:  # no escape: the raw text was checked already
        return text
    try:
        decoded = json.loads(text)
    except ValueError:
        return text  # not JSON: vLLM renders it as an empty object
    except RecursionError:
        raise BadRequest(f"{path} is nested too deeply", param=path) from None
    cleaned = clean(decoded, path, pattern, policy, EVERY_KEY)
    return text if cleaned == decoded else json.dumps(cleaned, ensure_ascii=False)


def _clean_message(
    message: Message, path: str, pattern: re.Pattern[str], policy: Policy
) -> Message:
    content = message.get("content")
    if isinstance(content, list):
        message = {**message, "content": merge_text_parts(content)}
    cleaned: Message = clean(message, path, pattern, policy)
    return cleaned


def merge_text_parts(parts: list[Any]) -> list[Any]:
    """Join adjacent text parts with a newline (as vLLM does) so no marker spans two parts."""
    merged: list[Any] = []
    for part in parts:
        if _is_text_part(part) and merged and _is_text_part(merged[-1]):
            merged[-1] = {**merged[-1], "text": merged[-1]["text"] + "\n" + part["text"]}
        else:
            merged.append(part)
    return merged


def _is_text_part(part: Any) -> bool:
    kind = part.get("type") if isinstance(part, dict) else None
    return isinstance(kind, str) and kind in _TEXT_PARTS


def shown(value: Any) -> str:
    """A client value for an error message: a string quoted (cut at 100 characters), anything
    else by its JSON type only."""
    if isinstance(value, str):
        return repr(value[:100] + "..." if len(value) > 100 else value)
    return "null" if value is None else f"a {type(value).__name__}"


def wrap(content: Any, template: Template, text_type: str = "text") -> Any:
    before, after = template.wrapper_parts
    if not before and not after:
        return content
    if isinstance(content, str):
        return before + content + after
    parts = list(content)
    texts = [i for i, part in enumerate(parts) if _is_text_part(part)]
    if not texts:
        return [{"type": text_type, "text": before + after}, *parts]
    first, last = texts[0], texts[-1]
    parts[first] = {**parts[first], "text": before + parts[first]["text"]}
    parts[last] = {**parts[last], "text": parts[last]["text"] + after}
    return parts


def _system_text(
    messages: list[Message], template: Template, policy: Policy, pattern: re.Pattern[str]
) -> str | None:
    """The one system text: the template's prompt, then (prepend) the client's, defused."""
    client: list[str] = []
    for index, message in enumerate(messages):
        if message["role"] not in SYSTEM_ROLES:
            continue
        path = f"messages[{index}]"
        if policy.system == "reject":
            raise BadRequest(
                f"{path}: this route does not accept {message['role']} messages; "
                f"its system prompt comes from the template {template.name!r}",
                param=f"{path}.role",
            )
        if policy.system == "prepend":
            text = plain_text(message.get("content"), f"{path}.content")
            if text:
                client.append(defuse(text, f"{path}.content", pattern, policy))
    parts = [template.system_prompt, *client] if template.system_prompt else client
    return "\n\n".join(parts) if parts else None


def plain_text(content: Any, path: str) -> str:
    """Text of a message: a string, or its text parts joined by newlines (as vLLM joins them)."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for i, part in enumerate(content):
        if not _is_text_part(part):
            raise BadRequest(
                f"{path}[{i}]: only text content parts are accepted here", param=f"{path}[{i}]"
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _checked_messages(body: Any) -> list[Message]:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of messages", param="messages")
    for index, message in enumerate(messages):
        path = f"messages[{index}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{path} must be an object", param=path)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a dict or list is unhashable
            raise BadRequest(
                f"{path}.role must be one of {', '.join(sorted(ROLES))}, got {shown(role)}",
                param=f"{path}.role",
            )
        check_content(message.get("content"), role, f"{path}.content")
    return messages


def check_content(content: Any, role: str, path: str) -> None:
    if isinstance(content, str):
        return
    if content is None:
        if role == "user":
            raise BadRequest(f"{path}: a user message needs content", param=path)
        return
    if not isinstance(content, list):
        raise BadRequest(f"{path} must be a string or a list of content parts", param=path)
    for i, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise BadRequest(f"{path}[{i}] must be an object with a type", param=f"{path}[{i}]")
        if part["type"] in _TEXT_PARTS and not isinstance(part.get("text"), str):
            raise BadRequest(f"{path}[{i}].text must be a string", param=f"{path}[{i}].text")


def _check_alternation(turns: list[dict[str, str]]) -> None:
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if not turns or [t["role"] for t in turns] != expected or turns[-1]["role"] != "user":
        raise BadRequest(
            "prompt mode needs turns that alternate user/assistant, "
            "starting and ending with a user message (system messages aside)",
            param="messages",
        )


def without_bypass_fields(
    body: dict[str, Any], policy: Policy, fields: tuple[str, ...] = BYPASS_FIELDS
) -> dict[str, Any]:
    if policy.bypass == "reject":
        for field in fields:
            if field in body and not _is_default(field, body[field]):
                raise BadRequest(
                    f"{field} is not accepted on this route: it would change the enforced "
                    "prompt template",
                    param=field,
                )
    return {key: value for key, value in body.items() if key not in fields}


def _is_default(field: str, value: Any) -> bool:
    """Values that change nothing: null, false, empty; add_generation_prompt: true;
    truncation (Responses API): "disabled"."""
    if field == "add_generation_prompt":
        return value is None or value is True
    if field == "truncation":
        return value is None or value == "disabled"
    if isinstance(value, str | list | dict):
        return not value
    return value is None or value is False


def _map_chat_fields(out: dict[str, Any], template: Template) -> None:
    """Chat-only fields to their /completions form, in place (see enforce_prompt)."""
    for field in ("tools", "functions"):
        if out.pop(field, None):
            raise BadRequest(
                f"{field}: prompt-mode templates have no tool-calling format", param=field
            )
    for field in ("tool_choice", "function_call"):
        choice = out.pop(field, None)
        if choice not in (None, "none", "auto"):
            raise BadRequest(
                f"{field}: prompt-mode templates have no tool-calling format", param=field
            )
    for field in _CHAT_ONLY:
        out.pop(field, None)
    # Chat defaults to "up to the context length", completions to 16 tokens: keep chat's.
    max_completion = out.pop("max_completion_tokens", None)
    if max_completion is not None:
        out["max_tokens"] = max_completion
    else:
        out.setdefault("max_tokens", None)
    logprobs, top = out.pop("logprobs", None), out.pop("top_logprobs", None)
    if logprobs is True:
        out["logprobs"] = int(top or 0)
    elif logprobs not in (None, False):
        raise BadRequest("logprobs must be true or false", param="logprobs")
    stop = _merged_stop(template.stop, out.get("stop"))
    if stop:
        out["stop"] = stop


def _merged_stop(template_stop: Iterable[str], client: Any) -> list[str]:
    if client is None:
        client = []
    elif isinstance(client, str):
        client = [client]
    elif not isinstance(client, list) or not all(isinstance(s, str) for s in client):
        raise BadRequest("stop must be a string or a list of strings", param="stop")
    return list(dict.fromkeys([*template_stop, *client]))
