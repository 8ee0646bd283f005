"""Plots for the bench reports: PNG files drawn with matplotlib's Agg backend (no display).

`figure(path)` is the one place that sets matplotlib up, sizes a figure, saves it and frees it;
every plot of every bench goes through it. matplotlib comes with the `bench` extra.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ptst.extras import require


@contextlib.contextmanager
def figure(path: Path, width: float = 6.4, height: float = 4.0) -> Iterator[Any]:
    """Yield the axes of a new figure; on exit lay it out, save it to `path` as PNG, close it."""
    matplotlib = require("matplotlib", "bench")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    try:
        yield ax
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def plot_cdf(
    path: Path, series: Mapping[str, Sequence[float]], xlabel: str, title: str = ""
) -> Path:
    """Empirical CDF of each series (e.g. TTFT per target) on one axis; returns path."""
    with figure(path) as ax:
        for name, values in series.items():
            xs = sorted(v for v in values if math.isfinite(v))
            if xs:
                ys = [(k + 1) / len(xs) for k in range(len(xs))]
                ax.step(xs, ys, where="post", label=f"{name} (n={len(xs)})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.set_title(title or f"CDF of {xlabel}")
        if ax.get_legend_handles_labels()[1]:
            ax.legend(loc="lower right")
    return path


def plot_lines(
    path: Path,
    x: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> Path:
    """One line per series over x (e.g. throughput vs concurrency); None points are skipped."""
    with figure(path) as ax:
        for name, ys in series.items():
            pts = [(a, b) for a, b in zip(x, ys, strict=True) if b is not None and math.isfinite(b)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.set_title(title or f"{ylabel} vs {xlabel}")
        if len(x) > 1 and min(x) > 0 and max(x) / min(x) >= 8:
            ax.set_xscale("log", base=2)
        if ax.get_legend_handles_labels()[1]:
            ax.legend()
    return path


def plot_bars(
    path: Path,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    ylabel: str,
    title: str = "",
    reference: float | None = None,
) -> Path:
    """Grouped bars: one group per metric/level, one bar per series (e.g. direct vs proxy).

    `reference` draws a dashed horizontal line (e.g. 1.0 for ratios).
    """
    with figure(path) as ax:
        n = max(len(series), 1)
        width = 0.8 / n
        for k, (name, values) in enumerate(series.items()):
            xs = [g + (k - (n - 1) / 2) * width for g in range(len(groups))]
            ys = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
            ax.bar(xs, ys, width=width, label=name)
        if reference is not None:
            ax.axhline(reference, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(list(range(len(groups))), list(groups))
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_title(title or ylabel)
        if ax.get_legend_handles_labels()[1]:
            ax.legend()
    return path
