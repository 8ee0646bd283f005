"""The report: markdown tables per prompt set and the refusal-rate plots."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ptst.bench.baselines import BASELINES
from ptst.bench.plots import figure
from ptst.bench.report import markdown_table
from ptst.bench.safety._prompts import PromptSet
from ptst.bench.safety._requests import Target
from ptst.bench.safety._results import Cell, Paired, ptst_matrix
from ptst.bench.wilson import Rate


def fmt_rate(r: Rate | None) -> str:
    """`0.700 [0.546, 0.819] (28/40)`; `-` when nothing was measured."""
    if r is None or r.n == 0:
        return "-"
    return f"{r.k / r.n:.3f} [{r.lo:.3f}, {r.hi:.3f}] ({r.k}/{r.n})"


def markdown_report(
    cells: Sequence[Cell],
    sets: Sequence[PromptSet],
    targets: Sequence[Target],
    meta: dict[str, Any],
    pairs: Sequence[Paired] = (),
) -> str:
    """Tables per prompt set (template x model), baselines, paired tests, judge, PTST matrix."""
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
    lines += ["## PTST matrix (train template x test template)", ""]
    any_matrix = False
    for prompt_set in sets:
        matrix = ptst_matrix(cells, prompt_set.name)
        if matrix is None:
            continue
        any_matrix = True
        tests = list(dict.fromkeys(t for row in matrix.values() for t in row))
        rows = [
            [train, *(fmt_rate(row[t].refusal) if t in row else "-" for t in tests)]
            for train, row in matrix.items()
        ]
        lines += [f"{prompt_set.name}, refusal rate:", ""]
        lines += [markdown_table(["trained with \\ served with", *tests], rows), ""]
    if not any_matrix:
        lines += [
            "Not applicable: no target declares the template it was trained with (`trained_with` "
            "in the proxy config with `--via-proxy --proxy-config`, or `--trained-with`).",
            "",
        ]
    return "\n".join(lines)


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
    by: dict[tuple[str, str, str], Cell],
    set_name: str,
    templates: Sequence[str],
    models: Sequence[str],
    show: Callable[[Cell], str],
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
    templates = list(dict.fromkeys(c.template for c in cells))
    models = list(dict.fromkeys(c.model for c in cells))
    with figure(path, width=max(6.4, 1.6 * len(templates) * max(1, len(models)))) as ax:
        width = 0.8 / max(len(models), 1)
        for k, model in enumerate(models):
            xs, ys, lo, hi = [], [], [], []
            for g, template in enumerate(templates):
                cell = next((c for c in cells if c.model == model and c.template == template), None)
                if cell is None or cell.refusal.value is None:
                    continue
                value = cell.refusal.value
                xs.append(g + (k - (len(models) - 1) / 2) * width)
                ys.append(value)
                lo.append(value - cell.refusal.lo)
                hi.append(cell.refusal.hi - value)
            ax.bar(xs, ys, width=width, label=model, yerr=[lo, hi], capsize=4)
        ax.set_xticks(list(range(len(templates))), templates)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("refusal rate (95% Wilson interval)")
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        if models:
            ax.legend()
    return path
