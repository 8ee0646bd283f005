"""Prompt sets: the built-in ones, or a local CSV/JSONL file; sampling a subset."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPTS_DIR = Path(__file__).parent.parent / "prompts"
BUILTIN_SETS = {"builtin-harmful": "harmful.jsonl", "builtin-benign": "benign.jsonl"}
PUBLIC_SETS = ("advbench", "harmbench", "xstest", "directharm4", "hex-phi", "jailbreakbench")


@dataclass(frozen=True)
class PromptSet:
    """A named list of prompts; `benign` sets measure over-refusal instead of safety."""

    name: str
    prompts: tuple[str, ...]
    benign: bool
    source: str


def jsonl_rows(path: Path, fields: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line whose `fields` are all strings; a bad line
    raises ValueError naming the file and line."""
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON: {exc.msg}") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(f), str) for f in fields):
            names = ", ".join(repr(f) for f in fields)
            raise ValueError(f"{path}:{number}: each line needs string fields {names}")
        yield number, row


def read_prompts(path: Path) -> list[str]:
    """Prompts from a CSV (first column; a header row is skipped) or JSONL (`prompt` field)."""
    if path.suffix.lower() in (".jsonl", ".json"):
        return [row["prompt"] for _, row in jsonl_rows(path, ("prompt",))]
    text = path.read_text(encoding="utf-8-sig")
    import csv

    rows = [row for row in csv.reader(text.splitlines()) if row and row[0].strip()]
    if rows and _looks_like_header(rows[0][0]):
        rows = rows[1:]
    return [row[0].strip() for row in rows]


def _looks_like_header(cell: str) -> bool:
    return cell.strip().lower() in {"prompt", "goal", "behavior", "instruction", "question", "text"}


def load_prompt_set(spec: str, benign_names: Iterable[str] = ()) -> PromptSet:
    """`builtin-harmful`, `builtin-benign`, `NAME=PATH` or a bare PATH (named after the file)."""
    spec = spec.strip()
    if spec in BUILTIN_SETS:
        path = PROMPTS_DIR / BUILTIN_SETS[spec]
        source = f"bench/prompts/{path.name} (built in)"
        return PromptSet(spec, tuple(read_prompts(path)), spec.endswith("benign"), source)
    name, _, where = spec.partition("=")
    if not where:
        name, where = Path(spec).stem, spec
    path = Path(where).expanduser()
    if not path.is_file():
        if spec.lower() in PUBLIC_SETS:
            raise ValueError(
                f"prompt set {spec!r}: public sets are not fetched by name (no dataset hub is "
                f"reachable from here); pass a local copy as {spec}=PATH (.csv or .jsonl)"
            )
        raise ValueError(f"prompt set {spec!r}: no such file {str(path)!r}")
    prompts = read_prompts(path)
    if not prompts:
        raise ValueError(f"prompt set {spec!r}: {path} holds no prompts")
    return PromptSet(name, tuple(prompts), name in set(benign_names), str(path))


def sample(prompts: Sequence[str], limit: int | None, every: int) -> list[tuple[int, str]]:
    """(index, prompt) of every `every`-th prompt, then the first `limit` of those."""
    chosen = [(i, p) for i, p in enumerate(prompts) if i % max(every, 1) == 0]
    return chosen if limit is None else chosen[:limit]
