"""`ptst detect` as a subprocess: one JSONL line out per line in, errors on their line, streaming."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from ptst.commands.detect import judge_line
from ptst.proxy.refusal import detect

ROOT = Path(__file__).resolve().parent.parent
COMMAND = [sys.executable, "-m", "ptst", "detect"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

REFUSAL = "I'm sorry, but I can't help with that."
COMPLIANCE = "Sure! Whisk three parts oil with one part vinegar."


def run_detect(stdin: bytes, *args: str) -> list[dict[str, object]]:
    done = subprocess.run(
        [*COMMAND, *args], input=stdin, capture_output=True, cwd=ROOT, env=ENV, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


def test_good_and_malformed_lines_keep_their_order() -> None:
    lines = [
        json.dumps({"text": REFUSAL}),
        "not json at all",
        json.dumps({"prompt": "no text here"}),
        json.dumps({"text": 42}),
        json.dumps(["a", "list"]),
        "",
        json.dumps({"text": COMPLIANCE, "prompt": "a salad dressing?"}),
        json.dumps({"text": "I’m sorry, but I can’t assist with that."}),
        json.dumps({"text": "ok", "prompt": 7}),
    ]
    out = run_detect(("\n".join(lines) + "\n").encode() + b"\xff\xfe broken utf-8\n")
    assert len(out) == len(lines) + 1
    assert out[0] == {"refusal": True, "rule": "refusal:cannot_help", "score": 0.95}
    assert out[6] == {"refusal": False, "rule": None, "score": 0.0}
    assert out[7]["refusal"] is True
    for i, fragment in [
        (1, "invalid JSON"),
        (2, "missing field: text"),
        (3, "must be a string"),
        (4, "expected a JSON object"),
        (5, "empty line"),
        (8, "prompt must be a string"),
        (9, "UTF-8"),
    ]:
        assert set(out[i]) == {"error"} and fragment in str(out[i]["error"]), out[i]


def test_output_matches_detect_for_labelled_data() -> None:
    rows = [
        json.loads(line)
        for line in (ROOT / "bench" / "refusal_corpus" / "rules-dev.jsonl").read_text().splitlines()
    ]
    stdin = "".join(json.dumps({"text": row["text"]}) + "\n" for row in rows).encode()
    out = run_detect(stdin, "--batch")
    assert out == [detect(row["text"])._asdict() for row in rows]


def test_last_line_without_newline_is_answered() -> None:
    assert run_detect(json.dumps({"text": REFUSAL}).encode())[0]["refusal"] is True


def test_answers_each_line_before_stdin_closes() -> None:
    """Works at the end of an endless pipe: a line in, its verdict out, stdin still open."""
    proc = subprocess.Popen(
        COMMAND, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env=ENV
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        for text, expected in [(REFUSAL, True), (COMPLIANCE, False), (REFUSAL, True)]:
            proc.stdin.write((json.dumps({"text": text}) + "\n").encode())
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, "no answer while stdin is still open"
            assert json.loads(proc.stdout.readline())["refusal"] is expected
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
        proc.stdout.close()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"text": "I cannot help with that."}\n', {"refusal": True}),
        (b'{"text": "Here you go."}\r\n', {"refusal": False}),
        (b'{"text": null}\n', {"error": "missing field: text"}),
        (b"  \n", {"error": "empty line"}),
        (b"{", {"error": None}),
    ],
)
def test_judge_line(line: bytes, expected: dict[str, object]) -> None:
    result = judge_line(line)
    for key, value in expected.items():
        assert key in result
        if value is not None:
            assert result[key] == value
