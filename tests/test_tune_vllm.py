"""Training renders what serving renders, token for token.

For each case a client conversation goes through the real proxy (`ptst serve`) to the
responder's `echo` upstream, which records the exact body the proxy sent; the real vLLM server
(demo model) then tokenizes that body with its `/tokenize` endpoint, the same rendering its
chat and completions endpoints apply. `ptst.tune.render.render_example` must produce exactly
those prompt tokens, and (messages mode) its prompt + answer tokens must be what vLLM renders for
the conversation with the answer as the assistant turn.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ptst.engine.demo_model import ensure_model
from ptst.proxy.rewrite import Policy
from ptst.proxy.templates import builtin_templates_dir, load_templates
from ptst.proxy.tokens import special_tokens
from ptst.tune.render import render_example
from tests.conftest import VLLM_MODEL, Proxy

pytestmark = pytest.mark.vllm
transformers = pytest.importorskip("transformers")

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
CASES = [
    ("chat:llama", "messages"),
    ("chat:vanilla", "messages"),
    ("chatml:llama", "prompt"),
    ("chat:vanilla", "prompt"),
]


def gsm8k_rows(n: int) -> list[dict[str, str]]:
    if GSM8K.is_file():
        with GSM8K.open() as lines:
            return [json.loads(next(lines)) for _ in range(n)]
    return [{"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}] * n


def conversations() -> list[tuple[list[dict[str, str]], str]]:
    """(client messages, answer): single-turn GSM8K, a client system message, two turns."""
    first, second = gsm8k_rows(2)
    user = [{"role": "user", "content": first["question"]}]
    return [
        (user, first["answer"]),
        ([{"role": "system", "content": "Answer step by step."}, *user], first["answer"]),
        (
            [
                *user,
                {"role": "assistant", "content": first["answer"]},
                {"role": "user", "content": second["question"]},
            ],
            second["answer"],
        ),
    ]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_model()


@pytest.fixture(scope="module")
def echo_proxy(start_proxy: Callable[..., Proxy], responder_url: str, model_dir: Path) -> Proxy:
    routes = [
        {
            "model": f"case-{i}",
            "upstream": responder_url,
            "upstream_model": "echo",
            "template": name,
            "mode": mode,
            "tokenizer": str(model_dir),  # as `ptst up` configures a route
        }
        for i, (name, mode) in enumerate(CASES)
    ]
    return start_proxy(routes)


def sent_upstream(proxy: Proxy, responder_url: str, route: str, messages: Any) -> dict[str, Any]:
    """The body the proxy sent upstream for `messages` (the responder keeps recent bodies)."""
    proxy.client().chat.completions.create(model=route, messages=messages)
    recent = httpx.get(f"{responder_url.removesuffix('/v1')}/debug/requests", timeout=10).json()
    body: dict[str, Any] = recent[-1]
    return body


def vllm_tokens(vllm_url: str, body: dict[str, Any]) -> list[int]:
    if "prompt" in body:
        request = {"model": VLLM_MODEL, "prompt": body["prompt"]}
    else:
        request = {"model": VLLM_MODEL, "messages": body["messages"], "add_generation_prompt": True}
    return tokenize(vllm_url, request)


def tokenize(vllm_url: str, request: dict[str, Any]) -> list[int]:
    answer = httpx.post(f"{vllm_url.removesuffix('/v1')}/tokenize", json=request, timeout=60)
    answer.raise_for_status()
    return list(answer.json()["tokens"])


@pytest.mark.parametrize(("case", "template_mode"), list(enumerate(CASES)))
def test_train_prompt_tokens_equal_what_vllm_serves(
    echo_proxy: Proxy,
    responder_url: str,
    vllm_url: str,
    model_dir: Path,
    case: int,
    template_mode: tuple[str, str],
) -> None:
    name, mode = template_mode
    template = load_templates(builtin_templates_dir())[name]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    policy = Policy(extra_markers=special_tokens(model_dir))
    for messages, answer in conversations():
        body = sent_upstream(echo_proxy, responder_url, f"case-{case}", messages)
        assert ("prompt" in body) == (mode == "prompt")
        served = vllm_tokens(vllm_url, body)
        rendered = render_example(messages, answer, template, tokenizer, policy, mode)  # type: ignore[arg-type]
        assert list(rendered.prompt_ids) == served
        if mode == "messages":
            with_answer = [*body["messages"], {"role": "assistant", "content": answer}]
            full = tokenize(vllm_url, {"model": VLLM_MODEL, "messages": with_answer})
            assert full[: len(rendered.input_ids)] == list(rendered.input_ids)
            assert tokenizer.decode(rendered.answer_ids).endswith("<|im_end|>")
