"""The special tokens of a Hugging Face tokenizer, read from its folder's JSON files.

A route with `tokenizer: <folder>` neutralizes (or rejects) these in client content like the
role markers built into proxy/rewrite.py: a model's own control tokens (SmolLM2's
`<repo_name>`, `<file_sep>`, ...; Qwen's `<|fim_prefix|>`, ...) should not reach it as text a
client typed. Plain JSON reading: the proxy does not need transformers for this.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_NAMED = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)


def special_tokens(folder: Path) -> tuple[str, ...]:
    """Every special token the folder's tokenizer files declare, in file order, once each.

    Raises ValueError when the folder holds none of the files or one is not valid JSON.
    """
    found = [folder / name for name in FILES if (folder / name).is_file()]
    if not found:
        raise ValueError(f"{folder}: no tokenizer files ({', '.join(FILES)})")
    tokens: dict[str, None] = {}
    for path in found:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read tokenizer file: {exc}") from None
        if isinstance(data, dict):
            tokens.update(dict.fromkeys(_declared(data)))
    # one character or padded tokens cannot be told apart from ordinary text: skip them
    return tuple(t for t in tokens if len(t) >= 2 and t == t.strip())


def _declared(data: dict[str, Any]) -> Iterator[str]:
    for entry in data.get("added_tokens", []):  # tokenizer.json
        if isinstance(entry, dict) and entry.get("special"):
            yield from _content(entry)
    decoder = data.get("added_tokens_decoder", {})  # tokenizer_config.json
    if isinstance(decoder, dict):
        for entry in decoder.values():
            if isinstance(entry, dict) and entry.get("special"):
                yield from _content(entry)
    for key in _NAMED:
        yield from _content(data.get(key))
    for entry in data.get("additional_special_tokens") or []:
        yield from _content(entry)


def _content(value: Any) -> Iterator[str]:
    """A token given as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str) and value:
        yield value
