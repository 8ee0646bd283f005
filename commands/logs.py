"""`ptst logs`: refusal counts and the latest records from the proxy's SQLite refusal log.

ptst logs stats [--db PATH | --config FILE] [--since 1h] [--by route|template|model] [--json]
ptst logs tail  [--db PATH | --config FILE] [-n 20] [--follow]
ptst logs get   [--db PATH | --config FILE] REQUEST_ID [--wait SECONDS]

`get` is how the client of a streamed answer reads its verdict: a stream's headers leave before
its text is judged, so `x-ptst-refusal` cannot carry it, but `x-request-id` does, and the record
under that id holds the verdict (with `log.second_stage`, once the classifier has run).
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from ptst.proxy.audit import GROUP_COLUMNS, by_request_id, query_stats, tail
from ptst.proxy.config import ConfigError, load_settings

DEFAULT_DB = Path("ptst-logs/refusals.sqlite3")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """'90s', '30m', '1h', '2d', '1.5h' -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. 90s, 30m, 1h, 2d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(
        dest="action", metavar="ACTION", required=True, help="stats, tail or get"
    )
    stats = sub.add_parser("stats", help="refusal counts and rates per group")
    _add_source(stats)
    stats.add_argument(
        "--since", type=parse_duration, metavar="DURATION", help="only the last 90s|30m|1h|2d"
    )
    stats.add_argument(
        "--by",
        choices=sorted(GROUP_COLUMNS),
        default="template",
        help="group by (default: template)",
    )
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    tail_parser = sub.add_parser("tail", help="print the last records as JSON lines")
    _add_source(tail_parser)
    tail_parser.add_argument("-n", type=int, default=20, metavar="N", help="how many (default 20)")
    tail_parser.add_argument("--follow", "-f", action="store_true", help="keep printing new ones")
    tail_parser.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    get = sub.add_parser("get", help="the record of one request, by its x-request-id")
    _add_source(get)
    get.add_argument("request_id", metavar="REQUEST_ID", help="the x-request-id response header")
    get.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for the record to be written (default: 0, look once)",
    )


def _add_source(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--db", type=Path, help=f"SQLite log (default {DEFAULT_DB})")
    group.add_argument("--config", type=Path, help="take the log path from this proxy config")


def run(args: argparse.Namespace) -> int:
    try:
        db = resolve_db(args.db, args.config)
        if args.action == "stats":
            rows = query_stats(db, args.since, args.by)
            print(json.dumps(rows, indent=2) if args.json else format_table(rows, args.by))
            return 0
        if args.action == "get":
            return _get(db, args.request_id, args.wait)
        return _tail(db, args.n, args.follow, args.interval)
    except FileNotFoundError as exc:
        hint = "" if args.db or args.config else " (pass --db PATH or --config FILE)"
        print(f"ptst logs: error: {exc}{hint}", file=sys.stderr)
        return 1
    except (ConfigError, sqlite3.Error) as exc:
        print(f"ptst logs: error: {exc}", file=sys.stderr)
        return 1


def resolve_db(db: Path | None, config: Path | None) -> Path:
    if db is not None:
        return db
    if config is None:
        return DEFAULT_DB
    path = load_settings(config).log.sqlite
    if path is None:
        raise ConfigError(f"{config}: log.sqlite is not set, so there is no database to read")
    return path


def format_table(rows: list[dict[str, Any]], by: str) -> str:
    if not rows:
        return "no records"
    total = {
        key: sum(row[key] for row in rows) for key in ("requests", "judged", "refusals", "errors")
    }
    total["group"] = "TOTAL"
    total["refusal_rate"] = total["refusals"] / total["judged"] if total["judged"] else None
    header = (by, "requests", "judged", "refusals", "rate", "errors")
    lines = [_cells(row) for row in [*rows, total]]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines[:-1]), rule, fmt(lines[-1])])


def _cells(row: dict[str, Any]) -> tuple[str, ...]:
    rate = row["refusal_rate"]
    return (
        "(none)" if row["group"] is None else str(row["group"]),
        str(row["requests"]),
        str(row["judged"]),
        str(row["refusals"]),
        "-" if rate is None else f"{100 * rate:.1f}%",
        str(row["errors"]),
    )


def _get(db: Path, request_id: str, wait: float) -> int:
    deadline = time.monotonic() + wait
    while True:
        records = by_request_id(db, request_id) if db.exists() or wait <= 0 else []
        if records or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if not records:
        print(f"ptst logs: no record for request id {request_id!r} in {db}", file=sys.stderr)
        return 1
    _print_records(list(enumerate(records)))
    return 0


def _tail(db: Path, n: int, follow: bool, interval: float) -> int:
    rows = tail(db, max(n, 1))
    last = rows[-1][0] if rows else 0
    _print_records(rows[-n:] if n > 0 else [])
    while follow:
        time.sleep(interval)
        rows = tail(db, 1000, after_id=last)
        if rows:
            last = rows[-1][0]
            _print_records(rows)
    return 0


def _print_records(rows: list[tuple[int, dict[str, Any]]]) -> None:
    for _, record in rows:
        print(json.dumps(record, ensure_ascii=False))
    sys.stdout.flush()
