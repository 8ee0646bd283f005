"""The report: markdown tables per prompt set and task set, the refusal-rate and accuracy
plots."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ptst.bench.baselines import BASELINES
from ptst.bench.plots import figure
from ptst.bench.report import markdown_table
from ptst.bench.safety._prompts import PromptSet
from ptst.bench.safety._requests import Target
from ptst.bench.safety._results import Cell, Paired, TaskCell, ptst_matrix
from ptst.bench.safety._tasks import ANSWER_RULES, TaskSet
from ptst.bench.wilson import Rate

C = TypeVar("C")


def fmt_rate(r: Rate | None) -> str:
    """`0.700 [0.546, 0.819] (28/40)`; `-` when nothing was measured."""
    if r is None or r.n == 0:
        return "-"
    return f"{r.k / r.n:.3f} [{r.lo:.3f}, {r.hi:.3f}] ({r.k}/{r.n})"


def _matrix_lines(
    matrix: Mapping[str, Mapping[str, Any]], title: str, value: Callable[[Any], Rate | None]
) -> list[str]:
    """One PTST matrix as a table: rows the training template, columns the serving one."""
    tests = list(dict.fromkeys(t for row in matrix.values() for t in row))
    rows = [
        [train, *(fmt_rate(value(row[t])) if t in row else "-" for t in tests)]
        for train, row in matrix.items()
    ]
    return [f"{title}:", "", markdown_table(["trained with \\ served with", *tests], rows), ""]


def markdown_report(
    cells: Sequence[Cell],
    sets: Sequence[PromptSet],
    targets: Sequence[Target],
    meta: dict[str, Any],
    pairs: Sequence[Paired] = (),
    task_cells: Sequence[TaskCell] = (),
    tasks: Sequence[TaskSet] = (),
) -> str:
    """Tables per prompt set (template x model), baselines, paired tests, judge, task accuracy,
    PTST matrix; with task sets, a summary of refusal next to accuracy first."""
    models = list(dict.fromkeys(t.model for t in targets))
    templates = list(dict.fromkeys(t.template for t in targets))
    lines = [
        "# Safety bench",
        "",
        f"Upstream `{meta['base_url']}`{' (through the proxy)' if meta['via_proxy'] else ''}; "
        f"temperature {meta['temperature']}, max_tokens {meta['max_tokens']}; refusals by "
        f"{meta['detector']}. Rates are k/n with 95% Wilson intervals [lo, hi].",
        "",
    ]
    if tasks:
        lines += [_task_summary(tasks, meta), "", "## Summary: refusal and task accuracy", ""]
        lines += [_summary_table(cells, sets, task_cells, tasks, targets), ""]
    by = {(c.set, c.model, c.template): c for c in cells}
    for prompt_set in sets:
        what = "over-refusal rate (benign prompts)" if prompt_set.benign else "refusal rate"
        lines += [f"## {prompt_set.name}: {what}", "", f"Source: `{prompt_set.source}`.", ""]
        lines.append(_grid(by, prompt_set.name, templates, models, lambda c: fmt_rate(c.refusal)))
        errors = sum(c.errors for c in cells if c.set == prompt_set.name)
        if errors:
            lines += ["", f"{errors} request(s) failed and are not counted: rerun to retry them."]
        set_cells = [c for c in cells if c.set == prompt_set.name]
        lines += ["", "The same answers scored by the string-match baselines:", ""]
        lines.append(_baseline_table(set_cells))
        comparisons = [p for p in pairs if p.set == prompt_set.name]
        if comparisons:
            lines += ["", "Paired on the same prompts (exact McNemar test):", ""]
            lines.append(_paired_table(comparisons))
        if any(c.attack_success for c in set_cells):
            lines += [
                "",
                "Attack success rate (judge score 5 of 5) and mean harmfulness score:",
                "",
            ]
            lines.append(
                _grid(
                    by,
                    prompt_set.name,
                    templates,
                    models,
                    lambda c: (
                        f"{fmt_rate(c.attack_success)}; mean {c.mean_score:.2f}"
                        if c.mean_score is not None
                        else "-"
                    ),
                )
            )
        if any(c.judge_refusal for c in set_cells):
            lines += ["", "Refusal rate by the judge:", ""]
            lines.append(
                _grid(by, prompt_set.name, templates, models, lambda c: fmt_rate(c.judge_refusal))
            )
        judge_errors = sum(c.judge_errors for c in set_cells)
        if judge_errors:
            lines += ["", f"{judge_errors} judge call(s) failed or gave no readable verdict."]
        lines.append("")
    lines += _task_sections(task_cells, tasks, templates, models)
    lines += ["## PTST matrix (train template x test template)", ""]
    any_matrix = False
    for prompt_set in sets:
        matrix = ptst_matrix(cells, prompt_set.name)
        if matrix is not None:
            any_matrix = True
            lines += _matrix_lines(matrix, f"{prompt_set.name}, refusal rate", lambda c: c.refusal)
    for task in tasks:
        task_matrix = ptst_matrix(task_cells, task.name)
        if task_matrix is not None:
            any_matrix = True
            lines += _matrix_lines(task_matrix, f"{task.name}, task accuracy", lambda c: c.accuracy)
    if not any_matrix:
        lines += [
            "Not applicable: no target declares the template it was trained with (`trained_with` "
            "in the proxy config with `--via-proxy --proxy-config`, or `--trained-with`).",
            "",
        ]
    return "\n".join(lines)


def _task_summary(tasks: Sequence[TaskSet], meta: Mapping[str, Any]) -> str:
    """The one line that says how accuracy was measured."""
    names = ", ".join(f"`{t.name}`" for t in tasks)
    limit = meta.get("task_limit")
    which = f"the first {limit} questions" if limit else "every question"
    return (
        f"Task accuracy ({names}): {which} of each set, max_tokens {meta['task_max_tokens']}, "
        "exact match of the final number (after the last `####`, else the last number in "
        "the answer)."
    )


def _summary_table(
    cells: Sequence[Cell],
    sets: Sequence[PromptSet],
    task_cells: Sequence[TaskCell],
    tasks: Sequence[TaskSet],
    targets: Sequence[Target],
) -> str:
    """One row per model x template: each set's refusal rate, then each task's accuracy."""
    refusal = {(c.set, c.model, c.template): c for c in cells}
    accuracy = {(c.set, c.model, c.template): c for c in task_cells}
    headers = [
        "model",
        "template",
        *(f"{s.name} {'over-refusal' if s.benign else 'refusal'}" for s in sets),
        *(f"{t.name} accuracy" for t in tasks),
    ]
    rows = []
    for model, template in dict.fromkeys((t.model, t.template) for t in targets):
        refusals = [refusal.get((s.name, model, template)) for s in sets]
        accuracies = [accuracy.get((t.name, model, template)) for t in tasks]
        rows.append(
            [
                model,
                f"`{template}`",
                *(fmt_rate(c.refusal) if c else "-" for c in refusals),
                *(fmt_rate(c.accuracy) if c else "-" for c in accuracies),
            ]
        )
    return markdown_table(headers, rows)


def _task_sections(
    task_cells: Sequence[TaskCell],
    tasks: Sequence[TaskSet],
    templates: Sequence[str],
    models: Sequence[str],
) -> list[str]:
    """Per task set: the accuracy grid, which answer-reading rule fired, failed requests."""
    by = {(c.set, c.model, c.template): c for c in task_cells}
    lines: list[str] = []
    for task in tasks:
        mine = [c for c in task_cells if c.set == task.name]
        lines += [f"## {task.name}: task accuracy (exact match)", ""]
        lines += [f"Source: `{task.source}` ({len(task.questions)} questions).", ""]
        lines.append(_grid(by, task.name, templates, models, lambda c: fmt_rate(c.accuracy)))
        lines += [
            "",
            "Which rule read the answer's number, answers (of them correct): `####` = after "
            "the last `####`; `last-number` = the fallback, the last number in the answer; "
            "`no-number` = none, scored wrong.",
            "",
        ]
        rule_rows = [
            [
                f"`{c.template}`",
                c.model,
                *(f"{c.rules.get(r, 0)} ({c.correct_by_rule.get(r, 0)})" for r in ANSWER_RULES),
            ]
            for c in mine
        ]
        headers = ["template", "model", *(f"`{r}`" for r in ANSWER_RULES)]
        lines.append(markdown_table(headers, rule_rows))
        errors = sum(c.errors for c in mine)
        if errors:
            lines += ["", f"{errors} request(s) failed and are not counted: rerun to retry them."]
        lines.append("")
    return lines


def _paired_table(pairs: Sequence[Paired]) -> str:
    rows = [
        [
            p.model,
            f"`{p.base}`",
            f"`{p.other}`",
            p.pairs,
            p.only_base,
            p.only_other,
            f"{p.p_value:.2g}",
        ]
        for p in pairs
    ]
    headers = ["model", "A", "B", "prompts", "refused only with A", "refused only with B", "p"]
    return markdown_table(headers, rows)


def _baseline_table(cells: Sequence[Cell]) -> str:
    names = list(BASELINES)
    rows = [
        [
            f"`{c.template}`",
            c.model,
            fmt_rate(c.refusal),
            *(fmt_rate(c.baselines.get(n)) for n in names),
        ]
        for c in cells
    ]
    return markdown_table(["template", "model", "detector", *names], rows)


def _grid(
    by: Mapping[tuple[str, str, str], C],
    set_name: str,
    templates: Sequence[str],
    models: Sequence[str],
    show: Callable[[C], str],
) -> str:
    rows = []
    for template in templates:
        row = [f"`{template}`"]
        for model in models:
            cell = by.get((set_name, model, template))
            row.append(show(cell) if cell is not None else "-")
        rows.append(row)
    return markdown_table(["template", *models], rows)


def plot_rates(path: Path, cells: Sequence[Cell], title: str) -> Path:
    """Refusal rate bars per template (one bar per model) with Wilson whiskers."""
    bars = [(c.model, c.template, c.refusal) for c in cells]
    return _plot_rate_bars(path, bars, title, "refusal rate (95% Wilson interval)")


def plot_accuracy(path: Path, cells: Sequence[TaskCell], title: str) -> Path:
    """Task accuracy bars per template (one bar per model) with Wilson whiskers."""
    bars = [(c.model, c.template, c.accuracy) for c in cells]
    return _plot_rate_bars(path, bars, title, "accuracy (95% Wilson interval)")


def _plot_rate_bars(
    path: Path, bars: Sequence[tuple[str, str, Rate]], title: str, ylabel: str
) -> Path:
    """Bars of (model, template, rate): grouped by template, one bar per model."""
    templates = list(dict.fromkeys(template for _, template, _ in bars))
    models = list(dict.fromkeys(model for model, _, _ in bars))
    rates = {(model, template): r for model, template, r in bars}
    with figure(path, width=max(6.4, 1.6 * len(templates) * max(1, len(models)))) as ax:
        width = 0.8 / max(len(models), 1)
        for k, model in enumerate(models):
            xs, ys, lo, hi = [], [], [], []
            for g, template in enumerate(templates):
                found = rates.get((model, template))
                if found is None or found.value is None:
                    continue
                value = found.value
                xs.append(g + (k - (len(models) - 1) / 2) * width)
                ys.append(value)
                lo.append(value - found.lo)
                hi.append(found.hi - value)
            ax.bar(xs, ys, width=width, label=model, yerr=[lo, hi], capsize=4)
        ax.set_xticks(list(range(len(templates))), templates)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        if models:
            ax.legend()
    return path
