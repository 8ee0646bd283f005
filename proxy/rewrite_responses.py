"""Template enforcement for the Responses API (`POST /v1/responses`): the guarantees of
`rewrite.enforce_chat`, for a request that vLLM turns into chat messages itself.

    enforce_responses(body, template, policy)  a body for upstream /responses

A pure function of (request body, template, policy) like the chat rewrite; it never changes its
input and raises `BadRequest` (400, with `param`) for requests the policy refuses.

How vLLM 0.32 builds the conversation (`responses/utils.py: construct_input_messages`):
`instructions` becomes the one system message, first; with `previous_response_id` the stored
history of that response follows *without its system messages* (instructions do not carry
over); then each new `input` item, where an item with a `role` reaches the chat template as a
message with that role. So the safety prompt goes into `instructions` on every request, turn
after turn, and what the client writes is checked here:
- `instructions` and system/developer input items follow the safety prompt (`prepend`), are
  dropped (`replace`) or answered with 400 (`reject`);
- role markers and special tokens in every string a chat template may render (item content,
  tool calls and their outputs, tool definitions) are neutralized or rejected as in chat;
- an item's role must be user, assistant, system or developer (vLLM passes any role through);
- fields that change how the prompt is built (`BYPASS_FIELDS`, `RESPONSES_BYPASS_FIELDS`, and
  a last item whose status is in_progress/incomplete, which vLLM continues as a prefill, like
  chat's `continue_final_message`) are stripped or answered with 400.
`background: true` is refused: its answer is fetched later from `GET /v1/responses/{id}`, which
the proxy does not serve, so it would never be judged or logged.
"""

from __future__ import annotations

import re
from typing import Any

from ptst.proxy.errors import BadRequest
from ptst.proxy.rewrite import (
    BYPASS_FIELDS,
    EVERY_KEY,
    SYSTEM_ROLES,
    Policy,
    check_content,
    clean,
    defuse,
    marker_pattern,
    merge_text_parts,
    plain_text,
    shown,
    without_bypass_fields,
    wrap,
)
from ptst.proxy.templates import Template

# Responses fields that change which prompt the model sees, on top of chat's.
RESPONSES_BYPASS_FIELDS: tuple[str, ...] = (
    *BYPASS_FIELDS,
    "previous_input_messages",  # a client-written history (Harmony models) nobody checks
    "conversation",  # a stored conversation's items, prepended unchecked where served
    "truncation",  # "auto" drops the oldest tokens first: the safety prompt
)
_ITEM_ROLES = frozenset({"user", "assistant", "system", "developer"})
_PREFILL_STATUS = frozenset({"in_progress", "incomplete"})


def enforce_responses(body: dict[str, Any], template: Template, policy: Policy) -> dict[str, Any]:
    """The safety prompt as `instructions`, client system text per policy, every item defused."""
    items = _checked_input(body)
    if body.get("background"):
        raise BadRequest(
            "background responses are not served through this proxy: their answer would be "
            "fetched later, past the refusal detector and the log. Send background: false.",
            param="background",
        )
    out = without_bypass_fields(body, policy, RESPONSES_BYPASS_FIELDS)
    pattern = marker_pattern(template.markers + policy.extra_markers)
    instructions = _instructions(body.get("instructions"), items, template, policy, pattern)
    if instructions is None:
        out.pop("instructions", None)
    else:
        out["instructions"] = instructions
    if isinstance(body["input"], str):
        out["input"] = wrap(defuse(body["input"], "input", pattern, policy), template)
    else:
        out["input"] = [
            _clean_item(item, f"input[{i}]", i == len(items) - 1, template, pattern, policy)
            for i, item in enumerate(items)
            if item.get("role") not in SYSTEM_ROLES
        ]
    if isinstance(out.get("tools"), list):
        out["tools"] = clean(out["tools"], "tools", pattern, policy, EVERY_KEY)
    return out


def _checked_input(body: Any) -> list[dict[str, Any]]:
    """The input items (none for a string input), each an object with a known role if any."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise BadRequest("instructions must be a string", param="instructions")
    value = body.get("input")
    if isinstance(value, str):
        return []
    if not isinstance(value, list):
        raise BadRequest("input must be a string or a list of input items", param="input")
    for index, item in enumerate(value):
        path = f"input[{index}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{path} must be an object", param=path)
        if "role" in item:
            role = item["role"]
            if not isinstance(role, str) or role not in _ITEM_ROLES:  # dicts are unhashable
                raise BadRequest(
                    f"{path}.role must be one of {', '.join(sorted(_ITEM_ROLES))}, "
                    f"got {shown(role)}",
                    param=f"{path}.role",
                )
            check_content(item.get("content"), role, f"{path}.content")
        elif not isinstance(item.get("type"), str):
            raise BadRequest(f"{path} needs a role or a type", param=path)
    return value


def _instructions(
    client: str | None,
    items: list[dict[str, Any]],
    template: Template,
    policy: Policy,
    pattern: re.Pattern[str],
) -> str | None:
    """The one system text: the template's prompt, then (prepend) the client's, defused."""
    if client and policy.system == "reject":
        raise BadRequest(
            "instructions: this route does not accept client instructions; its system prompt "
            f"comes from the template {template.name!r}",
            param="instructions",
        )
    texts: list[tuple[str, str]] = [("instructions", client)] if client else []
    for index, item in enumerate(items):
        if item.get("role") in SYSTEM_ROLES:
            path = f"input[{index}]"
            if policy.system == "reject":
                raise BadRequest(
                    f"{path}: this route does not accept {item['role']} items; its system "
                    f"prompt comes from the template {template.name!r}",
                    param=f"{path}.role",
                )
            texts.append((f"{path}.content", plain_text(item.get("content"), f"{path}.content")))
    kept = [] if policy.system == "replace" else texts
    parts = [defuse(text, path, pattern, policy) for path, text in kept if text]
    if template.system_prompt:
        parts.insert(0, template.system_prompt)
    return "\n\n".join(parts) if parts else None


def _clean_item(
    item: dict[str, Any],
    path: str,
    last: bool,
    template: Template,
    pattern: re.Pattern[str],
    policy: Policy,
) -> dict[str, Any]:
    if last and item.get("type", "message") in ("message", "reasoning"):
        if isinstance(item.get("status"), str) and item["status"] in _PREFILL_STATUS:
            if policy.bypass == "reject":
                raise BadRequest(
                    f"{path}.status: a last item marked {item['status']!r} makes the upstream "
                    "continue it as a prefill, which this route does not accept",
                    param=f"{path}.status",
                )
            item = {**item, "status": "completed"}
    content = item.get("content")
    if isinstance(content, list):
        item = {**item, "content": merge_text_parts(content)}
    cleaned: dict[str, Any] = clean(item, path, pattern, policy)
    if cleaned.get("role") == "user":
        cleaned["content"] = wrap(cleaned.get("content"), template, "input_text")
    return cleaned
