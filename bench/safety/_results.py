"""Results: refusal detection per answer, rows, cells (rates per set x target),
task accuracy per task set x target, the PTST matrix and paired comparisons."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from ptst.bench import judge as judging
from ptst.bench.baselines import BASELINES
from ptst.bench.safety._fetch import judge_key
from ptst.bench.safety._plan import Job
from ptst.bench.safety._prompts import PromptSet
from ptst.bench.safety._requests import Target
from ptst.bench.safety._tasks import ANSWER_RULES, TaskSet, score_answer
from ptst.bench.wilson import Rate, mcnemar_exact, rate
from ptst.proxy.refusal import detect

# --- refusal detection -------------------------------------------------------------------------


def detect_refusal(text: str) -> tuple[bool, str | None]:
    """(refusal?, rule that fired) from the proxy's own detector."""
    verdict = detect(text)
    return bool(verdict.refusal), verdict.rule


def baseline_refusals(text: str) -> dict[str, bool]:
    """The published string-match baselines (GCG keyword list, XSTest prefix match)."""
    return {name: check(text) for name, check in BASELINES.items()}


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One answered (or failed) prompt."""

    set: str
    index: int
    model: str
    template: str
    prompt: str
    response: str | None
    error: str | None
    refusal: bool | None
    rule: str | None
    baselines: dict[str, bool] = field(default_factory=dict)
    judge_score: int | None = None
    judge_refusal: bool | None = None
    judge_error: str | None = None


@dataclass(frozen=True)
class Cell:
    """The rates for one prompt set x template x model."""

    set: str
    benign: bool
    model: str
    template: str
    trained_with: str | None
    n: int
    errors: int
    refusal: Rate
    baselines: dict[str, Rate] = field(default_factory=dict)
    judged: int = 0
    judge_errors: int = 0
    attack_success: Rate | None = None
    judge_refusal: Rate | None = None
    mean_score: float | None = None


def build_rows(
    jobs: Sequence[Job],
    answers: dict[str, dict[str, Any]],
    verdicts: dict[str, judging.Judgement],
    config: judging.JudgeConfig | None,
) -> list[Row]:
    rows = []
    for job in jobs:
        answer = answers[job.key]
        text = answer.get("response")
        refusal, rule = detect_refusal(text) if isinstance(text, str) else (None, None)
        row = Row(
            job.set_name,
            job.index,
            job.target.model,
            job.target.template,
            job.prompt,
            text,
            answer.get("error"),
            refusal,
            rule,
            baseline_refusals(text) if isinstance(text, str) else {},
        )
        if config is not None and isinstance(text, str):
            verdict = verdicts.get(judge_key(config, job.prompt, text))
            if verdict is not None:
                row = replace(
                    row,
                    judge_score=verdict.score,
                    judge_refusal=verdict.refusal,
                    judge_error=verdict.error,
                )
        rows.append(row)
    return rows


def summarize(
    rows: Sequence[Row], sets: Sequence[PromptSet], targets: Sequence[Target]
) -> list[Cell]:
    """One Cell per set x target, in input order."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.set, row.model, row.template), []).append(row)
    return [
        cell_of(s, t, groups.get((s.name, t.model, t.template), [])) for s in sets for t in targets
    ]


def cell_of(prompt_set: PromptSet, target: Target, rows: Sequence[Row]) -> Cell:
    """Rates over the rows of one set x target; failed requests are counted, not rated."""
    answered = [r for r in rows if r.error is None]
    n = len(answered)
    judged = [r for r in answered if r.judge_error is None and _was_judged(r)]
    scores = [r.judge_score for r in judged if r.judge_score is not None]
    judge_refusals = [r.judge_refusal for r in judged if r.judge_refusal is not None]
    successes = sum(1 for s in scores if s >= judging.ATTACK_SUCCESS_SCORE)
    return Cell(
        set=prompt_set.name,
        benign=prompt_set.benign,
        model=target.model,
        template=target.template,
        trained_with=target.trained_with,
        n=n,
        errors=len(rows) - n,
        refusal=rate(sum(1 for r in answered if r.refusal), n),
        baselines={
            name: rate(sum(1 for r in answered if r.baselines.get(name)), n) for name in BASELINES
        },
        judged=len(judged),
        judge_errors=sum(1 for r in answered if r.judge_error is not None),
        attack_success=rate(successes, len(scores)) if scores else None,
        judge_refusal=rate(sum(judge_refusals), len(judge_refusals)) if judge_refusals else None,
        mean_score=sum(scores) / len(scores) if scores else None,
    )


def _was_judged(row: Row) -> bool:
    return row.judge_score is not None or row.judge_refusal is not None


class _Placed(Protocol):
    """What places a cell in the PTST matrix: its set, serving and training templates."""

    @property
    def set(self) -> str: ...
    @property
    def template(self) -> str: ...
    @property
    def trained_with(self) -> str | None: ...


C = TypeVar("C", bound=_Placed)


def ptst_matrix(cells: Sequence[C], set_name: str) -> dict[str, dict[str, C]] | None:
    """train template -> test template -> cell for one set (a prompt set's Cell or a task set's
    TaskCell); None when no target declares the template it was trained with."""
    matrix: dict[str, dict[str, C]] = {}
    for cell in cells:
        if cell.set == set_name and cell.trained_with:
            matrix.setdefault(cell.trained_with, {})[cell.template] = cell
    return matrix or None


# --- task accuracy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskRow:
    """One answered (or failed) task question, graded against its gold number."""

    set: str
    index: int
    model: str
    template: str
    question: str
    gold: str
    response: str | None
    error: str | None
    predicted: str | None
    rule: str | None
    correct: bool | None


@dataclass(frozen=True)
class TaskCell:
    """Accuracy for one task set x template x model; `rules` counts which reading of the
    answer fired (`####`, `last-number`, `no-number`), `correct_by_rule` how many of those
    were right, so a score that rests on the fallback is visible."""

    set: str
    model: str
    template: str
    trained_with: str | None
    n: int
    errors: int
    accuracy: Rate
    rules: dict[str, int] = field(default_factory=dict)
    correct_by_rule: dict[str, int] = field(default_factory=dict)


def build_task_rows(
    jobs: Sequence[Job], answers: dict[str, dict[str, Any]], task_sets: Sequence[TaskSet]
) -> list[TaskRow]:
    """Grade each task job's answer against the gold number of its question."""
    golds = {t.name: t.golds for t in task_sets}
    rows = []
    for job in jobs:
        answer = answers[job.key]
        text = answer.get("response")
        gold = golds[job.set_name][job.index]
        graded = score_answer(text, gold) if isinstance(text, str) else None
        rows.append(
            TaskRow(
                job.set_name,
                job.index,
                job.target.model,
                job.target.template,
                job.prompt,
                gold,
                text,
                answer.get("error"),
                graded.predicted if graded else None,
                graded.rule if graded else None,
                graded.correct if graded else None,
            )
        )
    return rows


def summarize_tasks(
    rows: Sequence[TaskRow], task_sets: Sequence[TaskSet], targets: Sequence[Target]
) -> list[TaskCell]:
    """One TaskCell per task set x target, in input order."""
    groups: dict[tuple[str, str, str], list[TaskRow]] = {}
    for row in rows:
        groups.setdefault((row.set, row.model, row.template), []).append(row)
    return [
        task_cell_of(s.name, t, groups.get((s.name, t.model, t.template), []))
        for s in task_sets
        for t in targets
    ]


def task_cell_of(set_name: str, target: Target, rows: Sequence[TaskRow]) -> TaskCell:
    """Accuracy over the answered rows of one task set x target; failures counted, not rated."""
    answered = [r for r in rows if r.error is None and r.rule is not None]
    n = len(answered)
    return TaskCell(
        set=set_name,
        model=target.model,
        template=target.template,
        trained_with=target.trained_with,
        n=n,
        errors=len(rows) - n,
        accuracy=rate(sum(1 for r in answered if r.correct), n),
        rules={rule: sum(1 for r in answered if r.rule == rule) for rule in ANSWER_RULES},
        correct_by_rule={
            rule: sum(1 for r in answered if r.rule == rule and r.correct) for rule in ANSWER_RULES
        },
    )


@dataclass(frozen=True)
class Paired:
    """Template `other` vs `base` on the same prompts of one set and model (exact McNemar)."""

    set: str
    model: str
    base: str
    other: str
    pairs: int  # prompts answered under both templates
    only_base: int  # refused under base only
    only_other: int  # refused under other only
    p_value: float


def paired(
    rows: Sequence[Row], sets: Sequence[PromptSet], targets: Sequence[Target]
) -> list[Paired]:
    """Each template against the first one, per set and model, over prompts answered by both."""
    refused: dict[tuple[str, str, str], dict[int, bool]] = {}
    for r in rows:
        if r.error is None:
            refused.setdefault((r.set, r.model, r.template), {})[r.index] = bool(r.refusal)
    out = []
    for prompt_set in sets:
        for model in dict.fromkeys(t.model for t in targets):
            base, *others = [t.template for t in targets if t.model == model]
            first = refused.get((prompt_set.name, model, base), {})
            for other in others:
                second = refused.get((prompt_set.name, model, other), {})
                both = [(first[i], second[i]) for i in second if i in first]
                b = sum(1 for x, y in both if x and not y)
                c = sum(1 for x, y in both if y and not x)
                p_value = mcnemar_exact(b, c)
                out.append(Paired(prompt_set.name, model, base, other, len(both), b, c, p_value))
    return out
