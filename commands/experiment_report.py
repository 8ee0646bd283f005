"""The PTST experiment's report: the train x test matrix (AdvBench refusal and GSM8K accuracy
per cell), the merge curve, the commands that ran, the machine and the time of each stage.
Pure reading of the safety bench's results.json files, then one Markdown page, one JSON file
and one PNG."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ptst.bench.plots import figure
from ptst.bench.report import markdown_table, to_jsonable
from ptst.bench.safety import fmt_rate
from ptst.bench.wilson import Rate

TRAIN_LABELS = {"base": "base (not fine-tuned)", "vanilla": "chat:vanilla", "llama": "chat:llama"}


def fmt(rate: Mapping[str, Any] | None) -> str:
    """`0.394 [0.353, 0.437] (41/104)` from a bench rate as results.json holds it, or `-`."""
    return fmt_rate(Rate(rate["k"], rate["n"], rate["lo"], rate["hi"]) if rate else None)


def combine(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One matrix from bench runs of one model each: their cells, task cells, paired tests
    and labels side by side; the first run's meta."""
    out: dict[str, Any] = {"meta": parts[0].get("meta", {}) if parts else {}, "labels": {}}
    for key in ("cells", "task_cells", "paired"):
        out[key] = [item for part in parts for item in part.get(key, [])]
    for part in parts:
        out["labels"] |= part.get("labels", {})
    out["folder"] = ", ".join(str(part.get("folder")) for part in parts)
    return out


def cell_map(results: Mapping[str, Any], key: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(model label, template) -> the bench's cell, for `cells` or `task_cells`."""
    labels: Mapping[str, str] = results.get("labels", {})
    return {
        (labels.get(c["model"], c["model"]), c["template"]): c
        for c in results.get(key, [])
        if not c.get("benign")
    }


def matrix_tables(matrix: Mapping[str, Any]) -> str:
    """Two tables, rows = the training template, columns = the test template."""
    refusal = cell_map(matrix, "cells")
    accuracy = cell_map(matrix, "task_cells")
    tests = list(dict.fromkeys(t for _, t in refusal))
    trains = [m for m in TRAIN_LABELS if any(m == label for label, _ in refusal)]
    out = []
    for title, cells, field in (
        ("AdvBench refusal rate (higher is safer)", refusal, "refusal"),
        ("GSM8K accuracy (higher is more useful)", accuracy, "accuracy"),
    ):
        rows = [
            [TRAIN_LABELS[m], *(fmt(cells.get((m, t), {}).get(field)) for t in tests)]
            for m in trains
        ]
        out.append(f"**{title}**, train (rows) x test (columns):\n\n")
        out.append(markdown_table(["trained with", *tests], rows) + "\n")
    return "\n".join(out)


def paired_table(matrix: Mapping[str, Any]) -> str:
    labels: Mapping[str, str] = matrix.get("labels", {})
    rows = [
        [
            TRAIN_LABELS.get(labels.get(p["model"], p["model"]), p["model"]),
            f"{p['base']} vs {p['other']}",
            p["pairs"],
            p["only_base"],
            p["only_other"],
            f"{p['p_value']:.2g}",
        ]
        for p in matrix.get("paired", [])
    ]
    head = ["trained with", "test templates", "pairs", "refused only 1st", "only 2nd", "p"]
    return markdown_table(head, rows)


def merge_points(
    matrix: Mapping[str, Any], merges: Mapping[float, Path | None]
) -> list[dict[str, Any]]:
    """One point per λ under chat:llama: λ = 0 is the matrix's base model, λ = 1 its
    chat:llama adapter (the fine-tune itself), unless a merge at that λ was measured."""
    refusal, accuracy = cell_map(matrix, "cells"), cell_map(matrix, "task_cells")
    points = [
        {
            "lambda": weight,
            "refusal": refusal.get((label, "chat:llama"), {}).get("refusal"),
            "accuracy": accuracy.get((label, "chat:llama"), {}).get("accuracy"),
            "source": f"the matrix's {label} x chat:llama cell",
        }
        for weight, label in ((0.0, "base"), (1.0, "llama"))
        if weight not in merges
    ]
    for weight, path in sorted(merges.items()):
        if path is None or not path.is_file():
            points.append({"lambda": weight, "refusal": None, "accuracy": None, "source": None})
            continue
        data = json.loads(path.read_text())
        cells, tasks = data.get("cells", []), data.get("task_cells", [])
        harmful = [c for c in cells if not c.get("benign")]
        points.append(
            {
                "lambda": weight,
                "refusal": harmful[0]["refusal"] if harmful else None,
                "accuracy": tasks[0]["accuracy"] if tasks else None,
                "source": str(path.parent),
            }
        )
    return sorted(points, key=lambda p: float(p["lambda"]))


def plot_curve(path: Path, points: list[dict[str, Any]]) -> Path:
    """Refusal rate and accuracy against λ, with Wilson whiskers."""
    with figure(path) as ax:
        for key, label in (("refusal", "AdvBench refusal rate"), ("accuracy", "GSM8K accuracy")):
            measured = [p for p in points if p[key] and p[key].get("rate") is not None]
            xs = [p["lambda"] for p in measured]
            ys = [p[key]["rate"] for p in measured]
            err = [
                [y - p[key]["lo"] for y, p in zip(ys, measured, strict=True)],
                [p[key]["hi"] - y for y, p in zip(ys, measured, strict=True)],
            ]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=label)
        ax.set_xlabel("λ: θ = (1 - λ)·θ_base + λ·θ_ft (chat:llama fine-tune, linear)")
        ax.set_ylabel("rate (95% Wilson interval)")
        ax.set_ylim(0, 1.05)
        ax.set_title("Merging the fine-tune back with its base, served with chat:llama")
        ax.grid(True, alpha=0.3)
        ax.legend()
    return path


def write(
    out: Path,
    log: Mapping[str, Any],
    commands: list[str],
    matrix: Mapping[str, Any],
    merges: Mapping[float, Path | None],
    run: Mapping[str, Any],
) -> Path:
    points = merge_points(matrix, merges)
    png = plot_curve(out / "merge-curve.png", points)
    stages = log.get("stages", {})
    curve_rows = [[p["lambda"], fmt(p["refusal"]), fmt(p["accuracy"])] for p in points]
    meta = matrix.get("meta", {})
    parts = [
        "# PTST experiment: train x test templates, and merging back\n",
        f"Preset: `{json.dumps(log.get('preset', {}))}`\n",
        f"AdvBench prompts per cell: {_per_cell(matrix, 'cells', 'refusal')} (of "
        f"{_set_size(meta)}); GSM8K questions per cell: "
        f"{_per_cell(matrix, 'task_cells', 'accuracy')}; greedy decoding; refusals by the "
        "proxy's detector.\n",
        "## Matrix\n",
        matrix_tables(matrix),
        "\nPaired exact McNemar tests between test templates, same prompts and model:\n",
        paired_table(matrix) + "\n",
        f"Bench report: `{matrix.get('folder')}`\n",
        "## Merge sweep\n",
        markdown_table(["λ", "AdvBench refusal", "GSM8K accuracy"], curve_rows) + "\n",
        f"![merge curve]({png.name})\n",
        "## Stages\n",
        markdown_table(["stage", "seconds"], [[k, v.get("seconds")] for k, v in stages.items()])
        + "\n",
        "## Commands\n",
        "```\n" + "\n".join(commands) + "\n```\n",
        "## Run\n",
        "```\n" + json.dumps(to_jsonable(run), indent=2) + "\n```\n",
    ]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    summary = {"preset": log.get("preset"), "stages": stages, "merge_curve": points}
    summary |= {"matrix": {"cells": matrix.get("cells"), "task_cells": matrix.get("task_cells")}}
    (out / "results.json").write_text(json.dumps(to_jsonable(summary), indent=2) + "\n")
    return path


def _set_size(meta: Mapping[str, Any]) -> str:
    sizes = [str(s.get("size")) for s in meta.get("sets", [])]
    return ", ".join(sizes) or "-"


def _per_cell(matrix: Mapping[str, Any], key: str, field: str) -> str:
    sizes = sorted({str(c[field]["n"]) for c in matrix.get(key, []) if not c.get("benign")})
    return ", ".join(sizes) or "-"
