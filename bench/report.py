"""Results folders for every bench: `results.json`, `report.md`, one self-contained `report.html`.

    folder = run_dir(Path("results"), "load", "http://127.0.0.1:8080/v1")
    png = plots.plot_cdf(folder / "ttft_cdf.png", {"direct": ttfts, "proxy": ttfts2}, "TTFT (s)")
    write_report(folder, "Load bench", data, markdown, [png])

The HTML page inlines its images as base64 PNG and needs nothing else: it can be mailed or
attached to a ticket. Plots are drawn by `ptst.bench.plots`.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "markdown_table",
    "markdown_to_html",
    "run_dir",
    "run_info",
    "slugify",
    "to_jsonable",
    "write_report",
]


def slugify(text: str, max_len: int = 40) -> str:
    """`http://127.0.0.1:8080/v1` -> `127-0-0-1-8080-v1`: safe in a folder name."""
    text = re.sub(r"^[a-z]+://", "", text.strip().lower())
    slug = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    return slug[:max_len].rstrip("-") or "run"


def run_dir(root: Path, kind: str, target: str) -> Path:
    """Create and return `root/<kind>-<YYYYmmdd-HHMMSS>-<slug of target>/` (suffixed if taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{slugify(kind, 20)}-{stamp}-{slugify(target)}"
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        path = root / (base if n == 0 else f"{base}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{root / base}: too many runs with the same name")


def to_jsonable(value: Any) -> Any:
    """Plain JSON types: NaN/inf become null, numpy scalars/arrays and Paths are converted."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalar or array
        return to_jsonable(value.tolist())
    return str(value)


def run_info(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The exact command and the machine it ran on, for every report: absolute figures on a
    shared machine mean little without them (the load average says how busy it was)."""
    args = list(sys.argv if argv is None else argv)
    command = shlex.join(["ptst", *args[1:]] if args and Path(args[0]).name == "ptst" else args)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        version = metadata.version("ptst-proxy")
    except metadata.PackageNotFoundError:
        version = "unknown"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "command": command,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "ptst_proxy": version,
        "load_average": [round(x, 2) for x in load] if load else None,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _run_section(info: Mapping[str, Any]) -> str:
    load = info.get("load_average")
    rows = [
        f"- command: `{info['command']}`",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['platform']}, "
        f"Python {info['python']}, ptst-proxy {info['ptst_proxy']}",
    ]
    if load:
        rows.append(f"- load average at the end (1, 5, 15 min): {load[0]}, {load[1]}, {load[2]}")
    rows.append(f"- finished: {info['finished']}")
    return "\n## Run\n\n" + "\n".join(rows) + "\n"


def write_report(
    run_dir: Path, title: str, data: dict[str, Any], markdown: str, images: list[Path]
) -> Path:
    """Write results.json, report.md and report.html into run_dir; return report.html's path.

    Images outside run_dir are copied in; any image the markdown does not already reference
    is appended under a "Figures" heading. A "Run" section (command, machine, load) closes
    the report, and `data` gets the same under "run" unless it has one.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    data = {**data, "run": data.get("run") or run_info()}
    local: list[Path] = []
    for image in images:
        target = run_dir / image.name
        if image.resolve() != target.resolve():
            shutil.copyfile(image, target)
        local.append(target)
    missing = [p for p in local if f"]({p.name})" not in markdown]
    body = markdown.rstrip() + "\n"
    if not body.lstrip().startswith("# "):
        body = f"# {title}\n\n{body}"
    if missing:
        body += "\n## Figures\n\n" + "\n\n".join(f"![{p.stem}]({p.name})" for p in missing) + "\n"
    body += _run_section(data["run"])

    (run_dir / "results.json").write_text(
        json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    (run_dir / "report.md").write_text(body, encoding="utf-8")
    inline = {p.name: _data_uri(p) for p in local}
    page = _HTML_PAGE.format(title=html.escape(title), body=markdown_to_html(body, inline))
    out = run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-style markdown table; floats get 4 significant digits (integers from 1000 on),
    None and NaN show as '-'."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            if not math.isfinite(value):
                return "-"
            return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --- markdown -> HTML (the subset the benches write) ---------------------------------------

_HTML_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
  color: #222; line-height: 1.45; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: .25rem .6rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
th {{ background: #f3f3f3; }}
code, pre {{ background: #f6f6f6; font-family: ui-monospace, monospace; }}
pre {{ padding: .6rem; overflow-x: auto; }}
img {{ max-width: 100%; }}
</style></head>
<body>
{body}
</body></html>
"""


def _data_uri(path: Path) -> str:
    mime = "image/svg+xml" if path.suffix.lower() == ".svg" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _inline(text: str, images: Mapping[str, str]) -> str:
    """Escape, then render images, links, `code` and **bold**."""
    out: list[str] = []
    for i, part in enumerate(re.split(r"(`[^`]*`)", text)):
        if i % 2:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        part = html.escape(part, quote=False)

        def image(m: re.Match[str]) -> str:
            src = images.get(m.group(2), m.group(2))
            return f'<img alt="{html.escape(m.group(1))}" src="{html.escape(src)}">'

        part = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", image, part)
        part = re.sub(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', part)
        part = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", part)
        out.append(part)
    return "".join(out)


def _table_cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def markdown_to_html(markdown: str, images: Mapping[str, str] | None = None) -> str:
    """Headings, tables, fenced code, bullet lists and paragraphs; `images` maps src -> data URI."""
    imgs = images or {}
    lines = markdown.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            i += 1
        elif stripped.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1 : j])) + "</code></pre>")
            i = j + 1
        elif m := re.match(r"(#{1,6})\s+(.*)", stripped):
            level = len(m.group(1))
            out.append(f"<h{level}>{_inline(m.group(2), imgs)}</h{level}>")
            i += 1
        elif (
            stripped.startswith("|")
            and i + 1 < len(lines)
            and re.fullmatch(r"\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?", lines[i + 1].strip())
        ):
            head = "".join(f"<th>{_inline(c, imgs)}</th>" for c in _table_cells(stripped))
            rows = []
            j = i + 2
            while j < len(lines) and lines[j].strip().startswith("|"):
                cells = "".join(f"<td>{_inline(c, imgs)}</td>" for c in _table_cells(lines[j]))
                rows.append(f"<tr>{cells}</tr>")
                j += 1
            out.append(
                f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            )
            i = j
        elif re.match(r"[-*]\s+", stripped):
            items = []
            while i < len(lines) and re.match(r"[-*]\s+", lines[i].strip()):
                items.append(f"<li>{_inline(lines[i].strip()[2:].strip(), imgs)}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not _starts_block(lines, i):
                para.append(lines[i].strip())
                i += 1
            out.append("<p>" + _inline(" ".join(para), imgs) + "</p>")
    return "\n".join(out)


def _starts_block(lines: list[str], i: int) -> bool:
    s = lines[i].strip()
    return s.startswith(("```", "|")) or bool(re.match(r"(#{1,6}|[-*])\s", s))
