"""The refusal detector's labelled corpus: answers labelled refusal / partial / compliance,
one JSONL file per source (docs/refusal-labelling-guide.md).

    load_corpus([path, ...]) -> [Example, ...]    files or folders of *.jsonl, checked
    draft_rows(cache_rows, source, family, kinds)  unlabelled rows from a `ptst bench safety`
                                                   response cache, for labellers to fill in

A source is the unit of the leave-one-source-out split: the file's `source` field, or its name.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptst.bench.safety._prompts import jsonl_rows

LABELS = ("refusal", "partial", "compliance")
CORPUS_DIR = Path(__file__).resolve().parent / "refusal_corpus"


@dataclass(frozen=True, slots=True)
class Example:
    id: str
    source: str
    family: str
    prompt_kind: str | None
    text: str
    label: str  # one of LABELS

    @property
    def positive(self) -> bool:
        """The detector's positive class: a full or partial refusal."""
        return self.label != "compliance"


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(path.glob("*.jsonl"))
        elif path.is_file():
            yield path
        else:
            raise ValueError(f"{path}: no such file or folder")


def load_corpus(paths: Sequence[Path] = (CORPUS_DIR,)) -> list[Example]:
    """Every labelled answer in `paths`; a bad line raises ValueError naming file and line."""
    examples: list[Example] = []
    seen: set[str] = set()
    for path in _files(paths):
        for number, row in jsonl_rows(path, ("text", "label")):
            if row["label"] not in LABELS:
                raise ValueError(
                    f"{path}:{number}: label {row['label']!r} is not one of {', '.join(LABELS)}"
                )
            source = str(row.get("source") or path.stem)
            ident = str(row.get("id") or f"{source}-{number:04d}")
            if ident in seen:
                raise ValueError(f"{path}:{number}: duplicate id {ident!r}")
            seen.add(ident)
            examples.append(
                Example(
                    id=ident,
                    source=source,
                    family=str(row.get("family") or source),
                    prompt_kind=row.get("prompt_kind"),
                    text=row["text"],
                    label=row["label"],
                )
            )
    if not examples:
        raise ValueError(f"no labelled answers in {', '.join(map(str, paths))}")
    return examples


def by_source(examples: Iterable[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = {}
    for example in examples:
        groups.setdefault(example.source, []).append(example)
    return dict(sorted(groups.items()))


def draft_rows(
    cache_rows: Iterable[Mapping[str, Any]],
    source: str,
    family: str,
    kinds: Mapping[str, str],
    id_prefix: str | None = None,
) -> list[dict[str, Any]]:
    """Unlabelled corpus rows from a response cache (`prompt`, `template`, `response` per
    row); `kinds` maps a prompt to harmful / borderline / benign. Repeated answers are kept
    once: the corpus counts distinct answers."""
    rows: list[dict[str, Any]] = []
    texts: set[str] = set()
    for row in cache_rows:
        text = row["response"]
        if not isinstance(text, str) or not text.strip() or text in texts:
            continue
        texts.add(text)
        rows.append(
            {
                "id": f"{id_prefix or source}-{len(rows) + 1:04d}",
                "source": source,
                "family": family,
                "prompt": row["prompt"],
                "prompt_kind": kinds.get(row["prompt"], "harmful"),
                "template": row.get("template"),
                "model": row.get("model"),
                "text": text,
                "label": "",
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ptst.bench.detect_corpus draft ...`: write unlabelled rows to stdout."""
    parser = argparse.ArgumentParser(prog="python -m ptst.bench.detect_corpus")
    parser.add_argument("command", choices=["draft"], help="draft: unlabelled rows from a cache")
    parser.add_argument("--cache", type=Path, required=True, help="a responses.jsonl cache")
    parser.add_argument("--source", required=True, help="the corpus source name")
    parser.add_argument("--family", required=True, help="the model family that answered")
    parser.add_argument(
        "--id-prefix", default=None, help="row ids are PREFIX-0001, ... (default: the source)"
    )
    parser.add_argument(
        "--kinds",
        action="append",
        default=[],
        metavar="KIND=PATH",
        help="prompt files (.jsonl, 'prompt' or 'question') whose prompts are of this kind; repeatable",
    )
    args = parser.parse_args(argv)
    kinds: dict[str, str] = {}
    for item in args.kinds:
        kind, _, path = item.partition("=")
        for _, row in jsonl_rows(Path(path), ()):
            kinds[str(row.get("prompt") or row.get("question"))] = kind
    cache = [row for _, row in jsonl_rows(args.cache, ("prompt", "response"))]
    for row in draft_rows(cache, args.source, args.family, kinds, args.id_prefix):
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
