"""Prompts for the load bench: synthetic ones of a given token length, or read from a file."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

CHARS_PER_TOKEN = 4  # the approximation used when no tokenizer is given
_WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week "
    "case point government company number group problem fact water money story lot right study "
    "book job word business issue side kind head house service friend father power hour game "
    "line end member law car city community name president team minute idea kid body back"
).split()


class Tokens:
    """Counts and makes prompts of a given token length, with a tokenizer or ~4 chars/token."""

    def __init__(self, tokenizer: Any | None = None) -> None:
        self.tokenizer = tokenizer

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return max(1, round(len(text) / CHARS_PER_TOKEN)) if text else 0
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def synthetic(self, n_tokens: int, rng: random.Random) -> str:
        """A random prompt of about n_tokens tokens (exactly, after re-encoding, with a tokenizer)."""
        if self.tokenizer is None:
            words: list[str] = []
            length = 0
            while length < n_tokens * CHARS_PER_TOKEN:
                words.append(rng.choice(_WORDS))
                length += len(words[-1]) + 1
            return " ".join(words)
        tok = self.tokenizer
        special = set(getattr(tok, "all_special_ids", []) or [])
        vocab = len(tok)
        ids = [i for i in (rng.randrange(vocab) for _ in range(n_tokens * 2)) if i not in special]
        text = tok.decode(ids[: n_tokens + 8], skip_special_tokens=True)
        ids = tok.encode(text, add_special_tokens=False)[:n_tokens]
        return str(tok.decode(ids, skip_special_tokens=True))


def load_tokenizer(path: str | None) -> Tokens:
    """AutoTokenizer from a folder; on failure (or none given) the ~4 chars/token approximation."""
    if not path:
        return Tokens(None)
    try:
        from transformers import AutoTokenizer

        return Tokens(AutoTokenizer.from_pretrained(path))
    except Exception as exc:  # any loader failure falls back, loudly
        print(f"warning: cannot load tokenizer from {path}: {exc}", file=sys.stderr)
        return Tokens(None)


def read_prompts(path: Path) -> list[str]:
    """One prompt per line (.txt), or JSONL/JSON with a `prompt`, `text`, `question` or `goal`."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".jsonl", ".json"):
        rows = json.loads(text) if path.suffix == ".json" else _jsonl(text)
        prompts = [_prompt_of(row) for row in rows]
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts


def _jsonl(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _prompt_of(row: Any) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        for key in ("prompt", "text", "question", "goal", "instruction"):
            if isinstance(row.get(key), str):
                return str(row[key])
    raise ValueError(f"cannot find a prompt in {str(row)[:80]!r}")


def make_prompts(
    n: int, input_len: int, tokens: Tokens, seed: int, path: Path | None = None
) -> list[str]:
    """n prompts: from a file (cycled), or synthetic ones of input_len tokens (seeded)."""
    rng = random.Random(seed)
    if path is not None:
        pool = read_prompts(path)
        return [pool[i % len(pool)] for i in range(n)]
    return [tokens.synthetic(input_len, rng) for _ in range(n)]
