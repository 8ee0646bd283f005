"""`ptst detect`: refusal detection over JSONL on stdin.

Each input line is an object with `text` (and optionally `prompt`, which is accepted and
ignored by the rules). With `--second-stage`, answers the rules are unsure about are judged
again by the second-stage classifier (`ptst.proxy.second_stage`, the 'detect' extra); its
verdicts carry rules ending in ":second_stage". Each output line, in the same order, is
`{"refusal": bool, "rule": str | null, "score": float}`, or `{"error": "..."}` for a line that
is not valid UTF-8 JSON, not an object, or has no string `text`. Lines are answered as they
arrive, so `ptst detect` works at the end of an endless pipe.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, BinaryIO, TextIO

from ptst.proxy.refusal import Verdict, detect


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--second-stage",
        action="store_true",
        help="ask the classifier where the rules are unsure (needs the 'detect' extra; "
        "loading it takes seconds)",
    )
    parser.add_argument(
        "--batch",
        action="store_true",
        help="flush output only at the end (faster on files; default: flush after every line)",
    )


def judge_line(line: bytes, judge: Callable[[str], Verdict] = detect) -> dict[str, Any]:
    """The output object for one input line."""
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        return {"error": "line is not valid UTF-8"}
    if not decoded.strip():
        return {"error": "empty line"}
    try:
        obj = json.loads(decoded)
    except ValueError as exc:
        return {"error": f"invalid JSON: {exc}"}
    if not isinstance(obj, dict):
        return {"error": f"expected a JSON object, got {type(obj).__name__}"}
    text = obj.get("text")
    if text is None:
        return {"error": "missing field: text"}
    if not isinstance(text, str):
        return {"error": f"field text must be a string, got {type(text).__name__}"}
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        return {"error": f"field prompt must be a string, got {type(prompt).__name__}"}
    verdict = judge(text)
    return {"refusal": verdict.refusal, "rule": verdict.rule, "score": verdict.score}


def process(
    source: BinaryIO,
    sink: TextIO,
    *,
    flush_each: bool = True,
    judge: Callable[[str], Verdict] = detect,
) -> int:
    """Answer every line of `source` on `sink`; returns the number of lines read."""
    count = 0
    for line in iter(source.readline, b""):
        count += 1
        sink.write(json.dumps(judge_line(line, judge)) + "\n")
        if flush_each:
            sink.flush()
    sink.flush()
    return count


def run(args: argparse.Namespace) -> int:
    judge = detect
    if args.second_stage:
        from ptst.engine.demo_model import ensure_model
        from ptst.proxy.second_stage import PROBE_MODEL, SecondStage

        ensure_model(PROBE_MODEL)  # the probe's model, built once
        judge = SecondStage.load().judge
    try:
        process(sys.stdin.buffer, sys.stdout, flush_each=not args.batch, judge=judge)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, like other Unix filters.
        sys.stderr.close()
    return 0
