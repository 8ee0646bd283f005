"""Output of the load bench: the markdown summary table and the plots."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ptst.bench import plots, report
from ptst.bench.load._run import Level


def summary_markdown(levels: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    """The readable table printed to the terminal and put in report.md."""
    headers = [
        "level",
        "target",
        "ok",
        "fail",
        "req/s",
        "out tok/s",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "ITL p50",
        "E2E p50",
        "E2E p99",
    ]
    rows = []
    for entry in levels:
        label = Level(entry["level"]["kind"], entry["level"]["value"]).label
        for name in names:
            s = entry["targets"][name]["summary"]
            rows.append(
                [
                    label,
                    name,
                    s["completed"],
                    s["failed"],
                    s["request_throughput"],
                    s["output_throughput"],
                    s["ttft_ms"]["p50"],
                    s["ttft_ms"]["p99"],
                    s["tpot_ms"]["p50"],
                    s["itl_ms"]["p50"],
                    s["e2e_ms"]["p50"],
                    s["e2e_ms"]["p99"],
                ]
            )
    text = "Latencies in ms.\n\n" + report.markdown_table(headers, rows)
    if len(names) > 1:
        crow = []
        for entry in levels:
            c = entry["compare"]
            label = Level(entry["level"]["kind"], entry["level"]["value"]).label
            r, a = c["ratio"], c["added_ms"]
            crow.append(
                [
                    label,
                    r["request_throughput"],
                    r["output_throughput"],
                    r["ttft_p50"],
                    r["ttft_p99"],
                    r["itl_p50"],
                    r["e2e_p50"],
                    a["ttft_p50"],
                    a["ttft_p99"],
                    a["itl_p50"],
                    a["e2e_p50"],
                ]
            )
        text += (
            f"\n\n## {names[1]} vs {names[0]}\n\nRatios are {names[1]} / {names[0]}; added is "
            f"{names[1]} − {names[0]} in ms.\n\n"
            + report.markdown_table(
                [
                    "level",
                    "req/s ratio",
                    "tok/s ratio",
                    "TTFT p50 ratio",
                    "TTFT p99 ratio",
                    "ITL p50 ratio",
                    "E2E p50 ratio",
                    "TTFT p50 added",
                    "TTFT p99 added",
                    "ITL p50 added",
                    "E2E p50 added",
                ],
                crow,
            )
        )
    errors: Counter[str] = Counter()
    for entry in levels:
        for name in names:
            errors.update(
                {f"{name}: {k}": v for k, v in entry["targets"][name]["summary"]["errors"].items()}
            )
    if errors:
        text += "\n\n## Errors\n\n" + report.markdown_table(
            ["target: error", "count"], list(errors.items())
        )
    return text


def make_plots(folder: Path, levels: Sequence[dict[str, Any]], names: Sequence[str]) -> list[Path]:
    """CDFs of TTFT and E2E, throughput/latency vs level, ratio bars when comparing."""

    def series(metric: str) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for entry in levels:
            label = Level(entry["level"]["kind"], entry["level"]["value"]).label
            for name in names:
                reqs = entry["targets"][name]["requests"]
                out[f"{name} {label}"] = [r[metric] for r in reqs if r["ok"]]
        return out

    images = [
        plots.plot_cdf(folder / "ttft_cdf.png", series("ttft"), "TTFT (s)"),
        plots.plot_cdf(folder / "e2e_cdf.png", series("e2e"), "E2E latency (s)"),
    ]
    if len(levels) > 1:
        kind = levels[0]["level"]["kind"]
        xs = [e["level"]["value"] for e in levels]

        def per(fn: Callable[[dict[str, Any]], float]) -> dict[str, list[float | None]]:
            return {n: [fn(e["targets"][n]["summary"]) for e in levels] for n in names}

        images.append(
            plots.plot_lines(
                folder / "throughput.png",
                xs,
                per(lambda s: s["output_throughput"]),
                kind,
                "output tokens/s",
            )
        )
        lat = per(lambda s: s["ttft_ms"]["p50"])
        lat = {f"{k} TTFT p50": v for k, v in lat.items()}
        lat |= {f"{k} E2E p50": v for k, v in per(lambda s: s["e2e_ms"]["p50"]).items()}
        images.append(plots.plot_lines(folder / "latency.png", xs, lat, kind, "latency (ms)"))
    if len(names) > 1:
        metrics = [
            "request_throughput",
            "output_throughput",
            "ttft_p50",
            "ttft_p99",
            "itl_p50",
            "e2e_p50",
        ]
        bars = {
            Level(e["level"]["kind"], e["level"]["value"]).label: [
                e["compare"]["ratio"][m] for m in metrics
            ]
            for e in levels
        }
        images.append(
            plots.plot_bars(
                folder / "ratios.png",
                ["req/s", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "E2E p50"],
                bars,
                f"{names[1]} / {names[0]}",
                reference=1.0,
            )
        )
    return images
