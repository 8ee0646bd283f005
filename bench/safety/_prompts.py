"""Prompt sets: the built-in ones, or a local CSV/JSONL file; sampling a subset."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

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


def read_prompts(path: Path) -> list[str]:
    """Prompts from a CSV (first column; a header row is skipped) or JSONL (`prompt` field)."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in (".jsonl", ".json"):
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON: {exc.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{number}: each line needs a string field 'prompt'")
            prompts.append(row["prompt"])
        return prompts
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
