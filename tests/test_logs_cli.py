"""`ptst logs stats`, `tail` and `get` on a SQLite log filled through the real sink."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pytest

from ptst.commands import logs as logs_cli
from ptst.commands.cli import main
from ptst.proxy.audit import SqliteSink
from ptst.proxy.record import LogRecord


def record(
    i: int, template: str | None, refusal: bool | None, age_s: float, **kw: Any
) -> LogRecord:
    values: dict[str, Any] = {
        "request_id": f"req-{i}",
        "time": time.time() - age_s,  # ages relative to when the fixture runs, not import
        "route": "demo" if i % 2 else "other",
        "upstream_model": "smollm2",
        "template": template,
        "mode": "messages",
        "stream": False,
        "status": 200,
        "refusal": refusal,
        "rule": "keyword" if refusal else None,
        "score": None,
        "latency_s": 0.2,
        "ttft_s": None,
        "prompt_tokens": 5,
        "completion_tokens": 7,
        "prompt_sha256": "cd" * 32,
    }
    values.update(kw)
    return LogRecord(**values)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "refusals.sqlite3"
    records = [
        # chat:llama, recent: 4 judged, 3 refusals, 1 unjudged error
        record(0, "chat:llama", True, 60),
        record(1, "chat:llama", True, 120),
        record(2, "chat:llama", False, 300),
        record(3, "chat:llama", True, 600),
        record(4, "chat:llama", None, 30, status=502, error="upstream timeout"),
        # chat:vanilla, recent: 4 judged, 1 refusal
        record(5, "chat:vanilla", False, 60),
        record(6, "chat:vanilla", True, 60),
        record(7, "chat:vanilla", False, 60),
        record(8, "chat:vanilla", False, 60),
        # old (two days ago): only counted without --since
        record(9, "chat:llama", False, 2 * 86400),
        record(10, "chat:vanilla", True, 2 * 86400),
        record(11, None, False, 2 * 86400),
    ]
    sink = SqliteSink(path)
    sink.write(records[:6])
    sink.write(records[6:])
    sink.close()
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["logs", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def by_group(rows: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    return {row["group"]: row for row in rows}


def test_stats_by_template_counts_and_rates(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "stats", "--db", str(db), "--by", "template", "--json")
    assert code == 0
    rows = by_group(json.loads(out))
    assert rows["chat:llama"] == {
        "group": "chat:llama",
        "requests": 6,
        "judged": 5,
        "refusals": 3,
        "refusal_rate": 0.6,
        "errors": 1,
    }
    assert rows["chat:vanilla"]["refusals"] == 2
    assert rows["chat:vanilla"]["refusal_rate"] == 2 / 5
    assert rows[None]["requests"] == 1 and rows[None]["refusal_rate"] == 0


def test_stats_since_filters_old_records(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "stats", "--db", str(db), "--since", "1h", "--json")
    assert code == 0
    rows = by_group(json.loads(out))
    assert set(rows) == {"chat:llama", "chat:vanilla"}
    assert (rows["chat:llama"]["judged"], rows["chat:llama"]["refusals"]) == (4, 3)
    assert rows["chat:llama"]["refusal_rate"] == 0.75
    assert rows["chat:vanilla"]["refusal_rate"] == 0.25

    code, out, _ = run(capsys, "stats", "--db", str(db), "--since", "90s", "--json")
    rows = by_group(json.loads(out))
    assert (rows["chat:llama"]["requests"], rows["chat:vanilla"]["requests"]) == (2, 4)


def test_stats_by_route_table(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "stats", "--db", str(db), "--by", "route")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["route", "requests", "judged", "refusals", "rate", "errors"]
    cells = {line.split()[0]: line.split()[1:] for line in lines[2:] if not line.startswith("-")}
    # odd ids are "demo": 1 (ref), 3 (ref), 5, 7, 9, 11 -> 6 requests, 2 refusals of 6
    assert cells["demo"] == ["6", "6", "2", "33.3%", "0"]
    assert cells["TOTAL"] == ["12", "11", "5", "45.5%", "1"]


def test_tail_prints_the_last_n_in_order(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "tail", "--db", str(db), "-n", "3")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["request_id"] for r in records] == ["req-9", "req-10", "req-11"]
    assert records[1]["refusal"] is True and records[1]["stream"] is False


def test_get_prints_one_request_or_says_none(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "get", "--db", str(db), "req-6")
    assert code == 0
    (only,) = [json.loads(line) for line in out.splitlines()]
    assert only["request_id"] == "req-6" and only["refusal"] is True
    code, out, err = run(capsys, "get", "--db", str(db), "req-404", "--wait", "0.3")
    assert code == 1 and not out
    assert "no record for request id 'req-404'" in err


def test_tail_follow_prints_new_records(
    db: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps = 0

    def fake_sleep(_: float) -> None:
        nonlocal sleeps
        sleeps += 1
        if sleeps == 1:
            SqliteSink(db).write([record(12, "chat:llama", True, 0), record(13, None, None, 0)])
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(logs_cli.time, "sleep", fake_sleep)
    code, out, _ = run(capsys, "tail", "--db", str(db), "-n", "1", "--follow")
    assert code == 130
    assert [json.loads(line)["request_id"] for line in out.splitlines()] == [
        "req-11",
        "req-12",
        "req-13",
    ]


def test_db_from_config(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ptst.proxy.yaml"
    config.write_text(f"log: {{sqlite: {db.name}, jsonl: null}}\n")
    code, out, _ = run(capsys, "tail", "--config", str(config), "-n", "1")
    assert code == 0 and json.loads(out)["request_id"] == "req-11"

    config.write_text("log: {sqlite: null}\n")
    code, _, err = run(capsys, "stats", "--config", str(config))
    assert code == 1 and "log.sqlite is not set" in err


def test_missing_db_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.sqlite3"
    code, out, err = run(capsys, "stats", "--db", str(missing))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and str(missing) in err
    assert not missing.exists()  # reading never creates a database


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("30m", 1800), ("1.5h", 5400), ("2d", 172800)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert logs_cli.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1", "h", "-1h", "1w"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        logs_cli.parse_duration(text)
