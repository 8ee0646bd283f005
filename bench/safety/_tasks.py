"""Task sets: what a template or a merge costs in helpfulness, next to what it buys in refusals.

A task set is a JSONL file in GSM8K's format (`{"question": ..., "answer": "... #### 18"}`).
Each question is sent verbatim as one user message, templated exactly like the prompt sets:
no few-shot examples and no format instruction, because the PTST fine-tunes are trained on
GSM8K rendered by the proxy's templates and learn the `#### N` ending from the data itself.

Scoring is exact numeric match, as the GSM8K paper and the PTST authors score it, with one
documented fallback so that a model never trained on `####` (an aligned base) is still
graded on its final number rather than on its formatting:

- gold: the text after the last `####` of the dataset's answer (commas, `$` and a trailing
  `.` stripped); a line without one is a data error, reported with its file and line;
- predicted: the first number after the model's last `####` (rule `####`); when the answer
  has no `####`, or nothing numeric follows it, the last number anywhere in the answer (rule
  `last-number`); no number at all is wrong (rule `no-number`);
- numbers compare as decimals: "18" == "18.0" == "18.00", "1,000" == "1000", "$5" == "5".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from ptst.bench.safety._prompts import jsonl_rows

RULE_HASH = "####"
RULE_LAST = "last-number"
RULE_NONE = "no-number"
ANSWER_RULES = (RULE_HASH, RULE_LAST, RULE_NONE)

# A number as written in answers: an optional sign and dollar sign (either order), digits with
# proper thousands commas or none, an optional decimal part. It may not start inside a word or
# after a digit ("GSM8K", "3-5" gives 3 and 5, not -5) and a trailing "." is a full stop.
_NUMBER = re.compile(r"(?<![\w.])(?:-\$?|\$-?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?!\d)(?:\.\d+)?")


@dataclass(frozen=True)
class TaskSet:
    """A named task: questions with their gold numbers (all of the file; the run takes the
    first `--task-limit`)."""

    name: str
    questions: tuple[str, ...]
    golds: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class Score:
    """One answer graded: the number read from it (None if none), the rule that read it."""

    correct: bool
    predicted: str | None
    rule: str


def to_decimal(text: str) -> Decimal | None:
    """`-$1,000.50` -> Decimal('-1000.50'); None when it is not a plain number."""
    cleaned = re.sub(r"[\s,$]", "", text).rstrip(".")
    if not re.fullmatch(r"[-+]?\d+(?:\.\d+)?", cleaned):
        return None
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def gold_number(answer: str) -> str:
    """The dataset's gold: the text after the final `####`, cleaned; ValueError if missing."""
    _, sep, tail = answer.rpartition("####")
    if not sep:
        raise ValueError("answer has no '#### <number>'")
    value = to_decimal(tail)
    if value is None:
        raise ValueError(f"not a number after '####': {tail.strip()[:40]!r}")
    return re.sub(r"[\s,$]", "", tail).rstrip(".")


def extract_answer(text: str) -> tuple[str | None, str]:
    """(number as written, rule): after the last `####` if a number follows it, else the
    last number in the text (the fallback for models not trained on the `####` format)."""
    _, sep, tail = text.rpartition("####")
    if sep:
        found = _NUMBER.search(tail)
        if found:
            return found.group(), RULE_HASH
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1], RULE_LAST
    return None, RULE_NONE


def score_answer(text: str, gold: str) -> Score:
    """Exact numeric match of the answer's number against the gold number."""
    predicted, rule = extract_answer(text)
    value = to_decimal(predicted) if predicted is not None else None
    correct = value is not None and value == to_decimal(gold)
    return Score(correct, predicted, rule)


def read_tasks(path: Path) -> list[tuple[str, str]]:
    """(question, gold number) per line of a GSM8K-format JSONL file; errors name the line."""
    items = []
    for number, row in jsonl_rows(path, ("question", "answer")):
        try:
            items.append((row["question"], gold_number(row["answer"])))
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
    return items


def load_task_set(spec: str) -> TaskSet:
    """`NAME=PATH` or a bare PATH (named after the file) of a GSM8K-format JSONL file."""
    spec = spec.strip()
    name, _, where = spec.partition("=")
    if not where:
        name, where = Path(spec).stem, spec
    path = Path(where).expanduser()
    if not path.is_file():
        hint = f"; pass a local copy as {spec}=PATH (.jsonl)" if "=" not in spec else ""
        raise ValueError(f"task set {spec!r}: no such file {str(path)!r}{hint}")
    items = read_tasks(path)
    if not items:
        raise ValueError(f"task set {spec!r}: {path} holds no questions")
    questions, golds = zip(*items, strict=True)
    return TaskSet(name, tuple(questions), tuple(golds), str(path))
