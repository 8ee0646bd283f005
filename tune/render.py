"""Render a training example to token ids exactly as serving will render the same conversation.

PTST is about which template a model saw in training versus at serving time, so training must
not approximate the serving prompt: it reuses the proxy's own rewrite (`ptst.proxy.rewrite`)
and then the same tokenization vLLM applies to what the proxy sends.

    messages mode  proxy: enforce_chat -> messages; vLLM: the model's chat template with
                   add_generation_prompt=True, tokenized without added special tokens
    prompt mode    proxy: enforce_prompt -> the template's Jinja string; vLLM /completions:
                   tokenized with the tokenizer's special tokens (BOS where it adds one)

The prompt tokens are exactly those (tests/test_tune_render_vllm.py compares them with vLLM's
/tokenize of what the real proxy sent). The answer follows as its own tokens: the text the
template renders for the assistant turn up to and including the first special token after the
answer (`<|im_end|>`, `<|eot_id|>`, `</s>`: the token generation stops on), or the tokenizer's
EOS token when the template renders none there (plain-text templates). Loss is on those answer
tokens only: every prompt token is labelled IGNORE.

Pure functions: no file or network access; the tokenizer is passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ptst.proxy.config import Mode
from ptst.proxy.rewrite import Message, Policy, enforce
from ptst.proxy.templates import Template

IGNORE = -100
"""The label of a token the loss skips (PyTorch's cross-entropy ignore_index)."""


_NEXT_TURN = "ptst-next-turn"


class RenderError(ValueError):
    """An example that cannot be rendered the way serving would render it."""


@dataclass(frozen=True)
class Rendered:
    """One tokenized example: `labels` is `input_ids` with the prompt part set to IGNORE."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt_len: int

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.input_ids[: self.prompt_len]

    @property
    def answer_ids(self) -> tuple[int, ...]:
        return self.input_ids[self.prompt_len :]


@dataclass(frozen=True)
class _Context:
    template: Template
    policy: Policy
    mode: Mode


def serving_request(
    messages: Sequence[Message], template: Template, policy: Policy, mode: Mode
) -> dict[str, Any]:
    """The body the proxy sends upstream for a client's `messages` (chat or completions)."""
    _path, body = enforce({"messages": list(messages)}, template, policy, mode)
    return body


def prompt_text(tokenizer: Any, body: dict[str, Any]) -> str:
    """The prompt string vLLM builds from the proxy's upstream body."""
    if "prompt" in body:
        return str(body["prompt"])
    text = tokenizer.apply_chat_template(
        body["messages"], tokenize=False, add_generation_prompt=True
    )
    return str(text)


def answer_text(
    tokenizer: Any, messages: Sequence[Message], answer: str, prompt: str, context: _Context
) -> str:
    """The text the model should generate after `prompt`: the rendered assistant turn, cut
    after the first special token that follows the answer (else the answer plus EOS)."""
    reply: Message = {"role": "assistant", "content": answer}
    if context.mode == "prompt":
        # The proxy renders prompt mode only up to a user turn: render one more (a placeholder)
        # after the answer, and keep what comes between the prompt and it.
        more = [*messages, reply, {"role": "user", "content": _NEXT_TURN}]
        full = str(serving_request(more, context.template, context.policy, "prompt")["prompt"])
        full = full[: full.rfind(_NEXT_TURN)]
    else:
        body = serving_request(messages, context.template, context.policy, "messages")
        conversation = [*body["messages"], reply]
        full = str(tokenizer.apply_chat_template(conversation, tokenize=False))
    if not full.startswith(prompt):
        raise RenderError(
            "the template renders the conversation with its answer differently from the prompt "
            "alone, so the answer cannot be appended to the serving prompt"
        )
    tail = full[len(prompt) :]
    at = tail.find(answer)
    if at < 0:
        raise RenderError(
            "the rendered assistant turn does not contain the answer verbatim (a template that "
            "rewrites it, or role markers in the answer that the proxy neutralizes)"
        )
    end = at + len(answer)
    special = _first_special(tail[end:], tokenizer)
    if special is not None:
        return tail[: end + special]
    eos = tokenizer.eos_token
    if not eos:
        raise RenderError("the tokenizer has no EOS token to end the answer with")
    return tail[:end] + str(eos)


def render_example(
    messages: Sequence[Message],
    answer: str,
    template: Template,
    tokenizer: Any,
    policy: Policy | None = None,
    mode: Mode | None = None,
) -> Rendered:
    """Token ids and labels for `messages` (what a client sends) followed by `answer`."""
    context = _Context(template, policy or Policy(), mode or template.mode)
    body = serving_request(messages, template, context.policy, context.mode)
    prompt = prompt_text(tokenizer, body)
    # vLLM: chat prompts carry their own special tokens; /completions adds BOS if the tokenizer does
    add_special = context.mode == "prompt"
    prompt_ids = list(tokenizer(prompt, add_special_tokens=add_special).input_ids)
    target = answer_text(tokenizer, messages, answer, prompt, context)
    answer_ids = list(tokenizer(target, add_special_tokens=False).input_ids)
    if not answer_ids:
        raise RenderError("the answer renders to no tokens")
    ids = (*prompt_ids, *answer_ids)
    labels = (IGNORE,) * len(prompt_ids) + tuple(answer_ids)
    return Rendered(ids, labels, len(prompt_ids))


def _first_special(text: str, tokenizer: Any) -> int | None:
    """End offset in `text` of the first special token it contains, or None."""
    best: int | None = None
    for token in tokenizer.all_special_tokens:
        if not token:
            continue
        at = text.find(token)
        if at >= 0 and (best is None or at + len(token) < best):
            best = at + len(token)
    return best
