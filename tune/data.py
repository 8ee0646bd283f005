"""Training data: chat JSONL (`{"messages": [...]}`) or question/answer JSONL (`{"question",
"answer"}`, e.g. GSM8K), read into one shape, `Example` = the conversation up to the answer and
the assistant answer the loss is computed on.

A chat line's last message must be the assistant's answer; the messages before it are the
conversation as a client would send it (the proxy's template is applied later, in render.py,
never here). `--limit N` takes a fixed subset chosen by the seed, so two runs with the same seed
train on the same rows, and a resumed run finds them again.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Message = dict[str, Any]


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class Example:
    """One training example: what the client sends (`messages`) and the answer to learn."""

    messages: tuple[Message, ...]
    answer: str


@dataclass(frozen=True)
class Dataset:
    """The examples used for training and where they came from (for the manifest)."""

    path: Path
    sha256: str
    rows: int  # lines in the file
    examples: tuple[Example, ...]  # the (seeded) subset actually used


def parse_line(data: Any, where: str) -> Example:
    """One JSON object -> Example: `{"messages": [..., assistant]}` or `{"question", "answer"}`."""
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object")
    if "messages" in data:
        messages = data["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise DataError(f"{where}: messages must be a list of 2+ messages")
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer")
        answer = last.get("content")
        if not isinstance(answer, str) or not answer.strip():
            raise DataError(f"{where}: the assistant answer must be non-empty text")
        return Example(tuple(messages[:-1]), answer.strip())
    question, answer = data.get("question"), data.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str):
        raise DataError(f"{where}: expected {{'messages': [...]}} or {{'question', 'answer'}}")
    if not question.strip() or not answer.strip():
        raise DataError(f"{where}: question and answer must be non-empty")
    return Example(({"role": "user", "content": question.strip()},), answer.strip())


def load_dataset(path: Path, limit: int | None = None, seed: int = 0) -> Dataset:
    """Read and check every line; with `limit`, a subset chosen by `seed` (file order kept)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    examples = []
    for number, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{number}: not JSON: {exc}") from None
        examples.append(parse_line(data, f"{path}:{number}"))
    if not examples:
        raise DataError(f"{path}: no examples")
    rows = len(examples)
    if limit is not None and limit < rows:
        chosen = sorted(random.Random(seed).sample(range(rows), limit))
        examples = [examples[i] for i in chosen]
    return Dataset(path, hashlib.sha256(raw).hexdigest(), rows, tuple(examples))
