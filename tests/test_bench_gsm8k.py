"""Task accuracy in the safety bench: GSM8K exact-match scoring, task files, and a run of
`ptst bench safety --tasks` against the responder.

The responder's `last-number` model answers "#### N" with N the last number of the question,
so each test question is written to be right or wrong on purpose; `echo` has no `####` and so
exercises the last-number fallback; `refuse` has no number at all.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from ptst.bench import safety
from ptst.bench.wilson import rate

ROOT = Path(__file__).resolve().parents[1]
GSM8K_TEST = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"

# --- scoring (pure) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "gold", "correct", "rule"),
    [
        ("So she makes 9 * 2 = 18 dollars.\n#### 18", "18", True, "####"),
        ("#### 1,000", "1000", True, "####"),
        ("#### $1,000.00", "1000", True, "####"),
        ("#### 18.0", "18", True, "####"),
        ("#### 18.50", "18.5", True, "####"),
        ("#### 18.5", "18", False, "####"),
        ("#### -3", "-3", True, "####"),
        ("#### 3", "-3", False, "####"),
        ("#### 18 dollars a day for 7 days", "18", True, "####"),
        ("#### 5\nWait, let me check again.\n#### 7", "7", True, "####"),
        ("#### 5\nWait, let me check again.\n#### 7", "5", False, "####"),
        ("She makes 18 dollars a day.", "18", True, "last-number"),
        ("The total is $1,250.", "1250", True, "last-number"),
        ("The change is 3-5 = -2", "-2", True, "last-number"),
        ("We need 3-5 boxes", "-5", False, "last-number"),
        ("The answer is **18**", "18", True, "last-number"),
        ("\\boxed{42}", "42", True, "last-number"),
        ("So the total is 12.\n####", "12", True, "last-number"),  # nothing after ####
        ("I'm sorry, but I can't help with that.", "5", False, "no-number"),
        ("GSM8K is a data set", "8", False, "no-number"),  # digits inside a word
        ("", "0", False, "no-number"),
    ],
)
def test_score_answer(text: str, gold: str, correct: bool, rule: str) -> None:
    graded = safety.score_answer(text, gold)
    assert (graded.correct, graded.rule) == (correct, rule), graded


def test_extract_answer_reads_the_number_as_written() -> None:
    assert safety.extract_answer("#### $1,000.") == ("$1,000", "####")
    assert safety.extract_answer("####18") == ("18", "####")
    assert safety.extract_answer("from 3-5 people") == ("5", "last-number")
    assert safety.extract_answer("none here") == (None, "no-number")


@pytest.mark.parametrize(
    ("answer", "gold"),
    [
        ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18", "18"),
        ("#### 1,000", "1000"),
        ("#### $18.", "18"),
        ("#### -5", "-5"),
        ("#### 2.5", "2.5"),
        ("a #### 1 then b #### 2", "2"),
    ],
)
def test_gold_number(answer: str, gold: str) -> None:
    assert safety.gold_number(answer) == gold


def test_gold_number_rejects_answers_without_one() -> None:
    with pytest.raises(ValueError, match="no '#### <number>'"):
        safety.gold_number("The answer is 18.")
    with pytest.raises(ValueError, match="not a number"):
        safety.gold_number("#### eighteen")


def test_to_decimal_compares_numbers_not_strings() -> None:
    assert safety.to_decimal("18") == safety.to_decimal("18.00") == safety.to_decimal("$18.")
    assert safety.to_decimal("1,000") == safety.to_decimal("1000")
    assert safety.to_decimal("-$3") == safety.to_decimal("-3")
    assert safety.to_decimal("3/4") is None and safety.to_decimal("") is None


# --- task files -------------------------------------------------------------------------------

QUESTIONS = [  # (question, the dataset's answer); `last-number` is right on 0 and 2
    ("A shop sells 1,200 pens a day. How many pens is that?", "It is 1,200.\n#### 1,200"),
    ("Tom has 3 apples and eats 1. How many are left?", "3 - 1 = 2\n#### 2"),
    ("What is 7.5 written with two decimals?", "#### 7.50"),
    ("What is the answer to everything?", "#### 42"),
    ("Never sent with --task-limit 4: 9", "#### 9"),
]


def _task_file(tmp_path: Path) -> Path:
    path = tmp_path / "mini.jsonl"
    lines = [json.dumps({"question": q, "answer": a}) for q, a in QUESTIONS]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return path


def test_load_task_set(tmp_path: Path) -> None:
    path = _task_file(tmp_path)
    loaded = safety.load_task_set(f"mini={path}")
    assert loaded.name == "mini" and loaded.source == str(path)
    assert loaded.questions[0].startswith("A shop") and len(loaded.questions) == 5
    assert loaded.golds == ("1200", "2", "7.50", "42", "9")
    assert safety.load_task_set(str(path)).name == "mini"


def test_task_file_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*'question', 'answer'"):
        safety.read_tasks(bad)
    bad.write_text('{"question": "q", "answer": "no gold"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: answer has no"):
        safety.read_tasks(bad)
    with pytest.raises(ValueError, match="gsm8k=PATH"):
        safety.load_task_set("gsm8k")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no questions"):
        safety.load_task_set(f"e={empty}")


@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason="shared GSM8K copy not present")
def test_shared_gsm8k_test_set_scores_its_own_answers_right() -> None:
    gsm8k = safety.load_task_set(f"gsm8k={GSM8K_TEST}")
    assert len(gsm8k.questions) == 1319 and gsm8k.golds[0] == "18"
    answers = [json.loads(line)["answer"] for line in GSM8K_TEST.open(encoding="utf-8")]
    graded = [safety.score_answer(a, g) for a, g in zip(answers, gsm8k.golds, strict=True)]
    assert all(s.correct and s.rule == "####" for s in graded)


def test_plan_tasks_takes_the_first_n_with_their_own_max_tokens(tmp_path: Path) -> None:
    tasks = safety.load_task_set(f"mini={_task_file(tmp_path)}")
    options = safety.Options(
        base_url="http://x/v1",
        models=["m"],
        templates=["default"],
        sampling=safety.Sampling(temperature=0.3, max_tokens=48),
        task_limit=2,
        task_max_tokens=300,
    )
    targets = safety.targets_for(options)
    jobs = safety.plan_tasks([tasks], targets, options, None)
    assert [(j.set_name, j.index) for j in jobs] == [("mini", 0), ("mini", 1)]
    assert all(j.body["max_tokens"] == 300 and j.body["temperature"] == 0.3 for j in jobs)
    assert jobs[0].body["messages"] == [{"role": "user", "content": QUESTIONS[0][0]}]
    unlimited = safety.plan_tasks([tasks], targets, replace(options, task_limit=None), None)
    assert len(unlimited) == 5


def test_task_cell_counts_rules_and_leaves_failures_out() -> None:
    def row(rule: str | None, correct: bool | None, error: str | None = None) -> safety.TaskRow:
        return safety.TaskRow("t", 0, "m", "default", "q", "1", None, error, None, rule, correct)

    rows = [
        row("####", True),
        row("####", False),
        row("last-number", True),
        row("no-number", False),
        row(None, None, "HTTP 500"),
    ]
    cell = safety.task_cell_of("t", safety.Target("m", "default", "chat:vanilla"), rows)
    assert (cell.n, cell.errors, cell.accuracy) == (4, 1, rate(2, 4))
    assert cell.rules == {"####": 2, "last-number": 1, "no-number": 1}
    assert cell.correct_by_rule == {"####": 1, "last-number": 1, "no-number": 0}
    assert cell.trained_with == "chat:vanilla"


# --- a run against the responder --------------------------------------------------------------


def _options(base_url: str, tmp_path: Path, **changes: Any) -> safety.Options:
    options = safety.Options(
        base_url=base_url,
        models=["last-number", "echo", "refuse"],
        templates=["default", "chat:llama"],
        prompt_specs=["builtin-harmful"],
        limit=2,
        task_specs=[f"mini={_task_file(tmp_path)}"],
        task_limit=4,
        trained_with={"last-number": "chat:vanilla"},
        cache_dir=tmp_path / "cache",
        out=tmp_path / "results",
        progress=False,
        retries=0,
        concurrency=4,
    )
    return replace(options, **changes)


def test_run_scores_accuracy_per_model_and_template(responder: str, tmp_path: Path) -> None:
    outcome = asyncio.run(safety.run_safety(_options(responder, tmp_path)))
    assert outcome.sent == 2 * 6 + 4 * 6  # prompts and task questions, six targets each
    accuracy = {(c.model, c.template): c.accuracy for c in outcome.task_cells}
    half, none = rate(2, 4), rate(0, 4)
    assert accuracy == {
        ("last-number", "default"): half,
        ("last-number", "chat:llama"): half,
        ("echo", "default"): half,  # no '####': the last-number fallback
        ("echo", "chat:llama"): half,  # the template's system prompt comes first: same number
        ("refuse", "default"): none,
        ("refuse", "chat:llama"): none,
    }
    by = {(c.model, c.template): c for c in outcome.task_cells}
    assert by["last-number", "default"].rules == {"####": 3, "last-number": 0, "no-number": 1}
    assert by["echo", "default"].correct_by_rule["last-number"] == 2
    assert by["refuse", "chat:llama"].rules["no-number"] == 4
    assert {r.index for r in outcome.task_rows} == {0, 1, 2, 3}  # the first 4 of 5
    assert {c.model: c.refusal.value for c in outcome.cells}["refuse"] == 1.0

    # the task questions went out with --task-max-tokens, the prompts with --max-tokens
    sent = httpx.get(responder.removesuffix("/v1") + "/debug/requests").json()
    questions = {q for q, _ in QUESTIONS}
    tasks = [b for b in sent if b["messages"][-1]["content"] in questions]
    assert len(sent) == 36 and len(tasks) == 24
    assert all(b["max_tokens"] == (256 if b in tasks else 48) for b in sent)

    folder = outcome.folder
    report = (folder / "report.md").read_text()
    assert "## Summary: refusal and task accuracy" in report
    assert "| model | template | builtin-harmful refusal | mini accuracy |" in report
    assert "## mini: task accuracy (exact match)" in report
    assert "| template | last-number | echo | refuse |" in report
    assert "0.500 [0.150, 0.850] (2/4)" in report and "0.000 [0.000, 0.490] (0/4)" in report
    assert "the first 4 questions" in report and "max_tokens 256" in report
    assert "mini, task accuracy:" in report  # the PTST matrix (last-number was trained)
    assert "| `default` | last-number | 3 (2) | 0 (0) | 1 (0) |" in report
    assert (folder / "accuracy-mini.png").read_bytes().startswith(b"\x89PNG")
    assert "![accuracy-mini](accuracy-mini.png)" in report

    data = json.loads((folder / "results.json").read_text())
    cell = data["task_cells"][0]
    assert (cell["set"], cell["model"], cell["template"]) == ("mini", "last-number", "default")
    assert cell["accuracy"]["rate"] == 0.5 and cell["accuracy"]["k"] == 2
    assert data["task_matrix"]["mini"]["chat:vanilla"]["chat:llama"]["accuracy"]["rate"] == 0.5
    assert data["meta"]["tasks"][0] | {"source": ""} == {
        "name": "mini",
        "source": "",
        "size": 5,
        "used": 4,
        "selection": "first N questions in file order",
        "scoring": data["meta"]["tasks"][0]["scoring"],
    }
    first = data["task_rows"][0]
    assert (first["gold"], first["predicted"], first["rule"], first["correct"]) == (
        "1200",
        "1,200",
        "####",
        True,
    )

    again = asyncio.run(safety.run_safety(_options(responder, tmp_path)))
    assert again.sent == 0 and again.task_cells == outcome.task_cells  # all from the cache
    longer = asyncio.run(safety.run_safety(_options(responder, tmp_path, task_max_tokens=64)))
    assert longer.sent == 4 * 6  # a new max_tokens is a new request; the prompts stay cached


def test_tasks_only_run_without_prompt_sets(responder: str, tmp_path: Path) -> None:
    options = _options(
        responder, tmp_path, prompt_specs=[], models=["last-number"], templates=["default"]
    )
    outcome = asyncio.run(safety.run_safety(options))
    assert outcome.cells == [] and [c.accuracy for c in outcome.task_cells] == [rate(2, 4)]
    assert "| model | template | mini accuracy |" in (outcome.folder / "report.md").read_text()


def test_failed_task_requests_are_counted_and_retried(responder: str, tmp_path: Path) -> None:
    options = _options(responder, tmp_path, models=["error-500"], templates=["default"])
    outcome = asyncio.run(safety.run_safety(replace(options, prompt_specs=[])))
    (cell,) = outcome.task_cells
    assert (cell.n, cell.errors, cell.accuracy.value) == (0, 4, None)
    assert "4 request(s) failed" in (outcome.folder / "report.md").read_text()


def test_cli_tasks_options(
    responder: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ptst.commands.cli import main

    argv = [
        "bench", "safety",
        "--base-url", responder,
        "--model", "last-number",
        "--prompts", "builtin-harmful",
        "--limit", "1",
        "--tasks", f"mini={_task_file(tmp_path)}",
        "--task-limit", "2",
        "--task-max-tokens", "128",
        "--cache", str(tmp_path / "cache"),
        "--out", str(tmp_path / "out"),
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "accuracy 0.500 [0.095, 0.905] (1/2)" in out
    (folder,) = (tmp_path / "out").iterdir()
    assert json.loads((folder / "results.json").read_text())["meta"]["task_max_tokens"] == 128

    assert main([*argv[:-1], "--task-limit", "0"]) == 2
    assert main([*argv[:-1], "--tasks", "gsm8k"]) == 2
