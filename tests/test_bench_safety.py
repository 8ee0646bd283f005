"""The safety bench: Wilson intervals, prompt sets, the resumable run, judge wiring, reports.

Runs against `python -m ptst.bench.responder` (a real HTTP upstream in a subprocess) whose `refuse`
model always refuses, and counts the requests it got through `/debug/stats`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from ptst.bench import judge as judging
from ptst.bench import safety
from ptst.bench.wilson import mcnemar_exact, rate, wilson

ROOT = Path(__file__).resolve().parents[1]
ADVBENCH = ROOT.parent / "shared" / "data" / "advbench_harmful_behaviors.csv"


# --- Wilson intervals ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (10, 10, 0.7225, 1.0),
        (0, 10, 0.0, 0.2775),
        (5, 10, 0.2366, 0.7634),
        (28, 40, 0.5457, 0.8193),
        (1, 520, 0.00034, 0.01081),
        (81, 263, 0.2553, 0.3662),  # Wilson's worked example as quoted by statsmodels' tests
    ],
)
def test_wilson_known_values(k: int, n: int, lo: float, hi: float) -> None:
    got_lo, got_hi = wilson(k, n)
    assert got_lo == pytest.approx(lo, abs=6e-5)
    assert got_hi == pytest.approx(hi, abs=6e-5)


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [(0, 0, 1.0), (5, 5, 1.0), (10, 0, 0.001953125), (1, 6, 0.125), (3, 12, 0.03515625)],
)
def test_mcnemar_exact(b: int, c: int, p: float) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(p)
    assert mcnemar_exact(c, b) == pytest.approx(p)


def test_wilson_edges() -> None:
    assert wilson(0, 0) == (0.0, 1.0)
    assert rate(0, 0).value is None
    assert rate(3, 4).value == 0.75
    with pytest.raises(ValueError):
        wilson(5, 4)
    # Symmetry: the interval of k/n mirrors that of (n-k)/n.
    lo, hi = wilson(3, 17)
    lo2, hi2 = wilson(14, 17)
    assert lo == pytest.approx(1 - hi2) and hi == pytest.approx(1 - lo2)


# --- prompt sets --------------------------------------------------------------------------


def test_builtin_sets_are_varied_and_sized() -> None:
    harmful = safety.load_prompt_set("builtin-harmful")
    benign = safety.load_prompt_set("builtin-benign")
    assert not harmful.benign and benign.benign
    for prompt_set in (harmful, benign):
        assert 45 <= len(prompt_set.prompts) <= 60
        assert len(set(prompt_set.prompts)) == len(prompt_set.prompts)
    assert any("kill a Python process" in p for p in benign.prompts)
    rows = [json.loads(line) for line in (safety.PROMPTS_DIR / "harmful.jsonl").open()]
    assert len({row["category"] for row in rows}) >= 8


def test_csv_with_and_without_header(tmp_path: Path) -> None:
    plain = tmp_path / "plain.csv"
    plain.write_text('first prompt\n"second, with a comma"\n\nthird\n', encoding="utf-8")
    assert safety.read_prompts(plain) == ["first prompt", "second, with a comma", "third"]
    headed = tmp_path / "headed.csv"
    headed.write_text("goal,target\nDo a thing,Sure\nDo another,Sure\n", encoding="utf-8")
    assert safety.read_prompts(headed) == ["Do a thing", "Do another"]


def test_jsonl_loading_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "set.jsonl"
    good.write_text('{"prompt": "a", "x": 1}\n\n{"prompt": "b"}\n', encoding="utf-8")
    loaded = safety.load_prompt_set(f"mine={good}", benign_names=["mine"])
    assert loaded.prompts == ("a", "b") and loaded.name == "mine" and loaded.benign
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        safety.read_prompts(bad)
    with pytest.raises(ValueError, match="no such file"):
        safety.load_prompt_set("advbench=/nonexistent/advbench.csv")
    with pytest.raises(ValueError, match="not fetched by name"):
        safety.load_prompt_set("harmbench")
    assert safety.load_prompt_set(str(good)).name == "set"


@pytest.mark.skipif(not ADVBENCH.is_file(), reason="shared AdvBench copy not present")
def test_advbench_csv_has_520_prompts() -> None:
    advbench = safety.load_prompt_set(f"advbench={ADVBENCH}")
    assert len(advbench.prompts) == 520 and not advbench.benign
    assert advbench.prompts[0].startswith("Write a script that can exploit")


def test_sample_every_then_limit() -> None:
    prompts = [f"p{i}" for i in range(10)]
    assert safety.sample(prompts, None, 3) == [(0, "p0"), (3, "p3"), (6, "p6"), (9, "p9")]
    assert safety.sample(prompts, 2, 3) == [(0, "p0"), (3, "p3")]


# --- request bodies and cache keys ----------------------------------------------------------


def _fake_enforce(body: dict[str, Any], template: str) -> dict[str, Any]:
    system = {"role": "system", "content": f"SYSTEM<{template}>"}
    return {**body, "messages": [system, *body["messages"]]}


def test_request_body_and_cache_key() -> None:
    sampling = safety.Sampling(temperature=0.0, max_tokens=48)
    plain = safety.request_body("hi", safety.Target("m", "default"), sampling, _fake_enforce)
    assert plain["messages"] == [{"role": "user", "content": "hi"}]
    assert plain["max_tokens"] == 48 and plain["temperature"] == 0.0
    llama = safety.request_body("hi", safety.Target("m", "chat:llama"), sampling, _fake_enforce)
    assert llama["messages"][0] == {"role": "system", "content": "SYSTEM<chat:llama>"}
    routed = safety.request_body("hi", safety.Target("r", "x", via_proxy=True), sampling, None)
    assert routed["messages"] == [{"role": "user", "content": "hi"}]

    target = safety.Target("m", "default")
    key = safety.cache_key("hi", target, plain)
    assert key == safety.cache_key("hi", target, dict(plain))
    assert key != safety.cache_key("hi!", target, plain)
    assert key != safety.cache_key("hi", safety.Target("m2", "default"), plain)
    assert key != safety.cache_key("hi", target, {**plain, "max_tokens": 49})
    assert key != safety.cache_key("hi", target, {**plain, "temperature": 0.7})


def test_cache_skips_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    cache = safety.JsonlCache(path)
    cache.put({"key": "a", "response": "1"})
    cache.put({"key": "b", "response": "2"})
    cache.close()
    with path.open("a") as f:
        f.write('{"key": "c", "resp')  # killed mid-write
    again = safety.JsonlCache(path)
    assert set(again.records) == {"a", "b"}
    again.put({"key": "d", "response": "4"})  # appended after the torn line, not onto it
    again.close()
    assert set(safety.JsonlCache(path).records) == {"a", "b", "d"}


# --- runs against the responder ---------------------------------------------------------------


def _sent(base_url: str, model: str) -> int:
    stats = httpx.get(base_url.removesuffix("/v1") + "/debug/stats").json()
    return int(stats["by_model"].get(model, 0))


def _options(base_url: str, tmp_path: Path, **changes: Any) -> safety.Options:
    options = safety.Options(
        base_url=base_url,
        models=["refuse"],
        prompt_specs=["builtin-harmful"],
        limit=10,
        cache_dir=tmp_path / "cache",
        out=tmp_path / "results",
        progress=False,
        retries=0,
        concurrency=4,
    )
    return replace(options, **changes)


def test_always_refusing_upstream_gives_rate_one(responder: str, tmp_path: Path) -> None:
    outcome = asyncio.run(safety.run_safety(_options(responder, tmp_path)))
    (cell,) = outcome.cells
    assert (cell.n, cell.errors, cell.refusal.k) == (10, 0, 10)
    assert cell.refusal.value == 1.0
    assert cell.refusal.lo == pytest.approx(0.7225, abs=1e-4) and cell.refusal.hi == 1.0
    assert outcome.sent == 10
    assert all(row.rule for row in outcome.rows)

    folder = outcome.folder
    for name in ("results.json", "report.md", "report.html", "refusal-builtin-harmful.png"):
        assert (folder / name).is_file(), name
    assert (folder / "refusal-builtin-harmful.png").read_bytes().startswith(b"\x89PNG")
    report = (folder / "report.md").read_text()
    assert "1.000 [0.722, 1.000] (10/10)" in report
    assert "PTST matrix" in report and "Not applicable" in report
    assert "gcg_keyword" in report and "xstest_strmatch" in report
    assert "data:image/png;base64," in (folder / "report.html").read_text()
    data = json.loads((folder / "results.json").read_text())
    assert data["cells"][0]["refusal"]["rate"] == 1.0
    assert len(data["rows"]) == 10 and data["rows"][0]["response"].startswith("I'm sorry")
    assert not (folder / "responses.jsonl").exists()  # the cache stays out of the results


def test_benign_set_measures_over_refusal(responder: str, tmp_path: Path) -> None:
    options = _options(
        responder, tmp_path, models=["plain", "refuse"], prompt_specs=["builtin-benign"], limit=5
    )
    outcome = asyncio.run(safety.run_safety(options))
    rates = {c.model: c.refusal.value for c in outcome.cells}
    assert rates == {"plain": 0.0, "refuse": 1.0}
    assert all(c.benign for c in outcome.cells)
    assert "over-refusal" in (outcome.folder / "report.md").read_text()


def test_paired_comparison_counts_discordant_prompts() -> None:
    prompt_set = safety.PromptSet("s", ("a", "b", "c", "d"), False, "mem")
    targets = [safety.Target("m", "default"), safety.Target("m", "chat:llama")]

    def row(template: str, index: int, refusal: bool) -> safety.Row:
        return safety.Row("s", index, "m", template, "p", "r", None, refusal, None)

    rows = [
        *(row("default", i, r) for i, r in enumerate([True, True, True, False])),
        *(row("chat:llama", i, r) for i, r in enumerate([False, False, True, True])),
        safety.Row("s", 4, "m", "chat:llama", "p", None, "HTTP 500", None, None),
    ]
    (result,) = safety.paired(rows, [prompt_set], targets)
    assert (result.base, result.other, result.pairs) == ("default", "chat:llama", 4)
    assert (result.only_base, result.only_other) == (2, 1)
    assert result.p_value == pytest.approx(1.0)


def test_interrupted_run_resumes_without_resending(responder: str, tmp_path: Path) -> None:
    model = "refuse"
    options = _options(responder, tmp_path, limit=10)
    before = _sent(responder, model)
    first = asyncio.run(safety.run_safety(options))
    assert first.sent == 10 and _sent(responder, model) - before == 10

    # Simulate a kill after 6 answers: keep 6 cached lines plus a torn 7th.
    cache_file = options.cache_dir / "responses.jsonl"
    lines = cache_file.read_text().splitlines()
    cache_file.write_text("\n".join(lines[:6]) + "\n" + lines[6][:20])

    before = _sent(responder, model)
    resumed = asyncio.run(safety.run_safety(options))
    assert resumed.sent == 4 and _sent(responder, model) - before == 4
    assert resumed.cells[0].n == 10 and resumed.cells[0].refusal.k == 10

    before = _sent(responder, model)
    again = asyncio.run(safety.run_safety(options))
    assert again.sent == 0 and _sent(responder, model) - before == 0

    # A larger --limit only sends the new prompts; other sampling settings are new keys.
    more = asyncio.run(safety.run_safety(replace(options, limit=12)))
    assert more.sent == 2
    hotter = replace(options, sampling=safety.Sampling(temperature=0.7, max_tokens=48))
    assert asyncio.run(safety.run_safety(hotter)).sent == 10


def test_templates_are_applied_with_the_proxy_rewrite(responder: str, tmp_path: Path) -> None:
    from ptst.proxy.templates import builtin_templates_dir, load_templates

    templates = load_templates(builtin_templates_dir())
    llama = templates["chat:llama"].system_prompt
    short = templates["chat:llama-short"].system_prompt
    assert llama and short and short in llama
    options = _options(
        responder,
        tmp_path,
        models=["echo"],
        templates=["default", "chat:llama", "chat:llama-short"],
        limit=2,
    )
    outcome = asyncio.run(safety.run_safety(options))
    seen = {}  # template -> the messages the upstream received (echoed back as JSON)
    for row in outcome.rows:
        assert row.response is not None
        seen[row.template] = json.loads(row.response)
    assert seen["default"] == [{"role": "user", "content": outcome.rows[-1].prompt}]
    assert seen["chat:llama"][0] == {"role": "system", "content": llama}
    assert seen["chat:llama-short"][0] == {"role": "system", "content": short}
    assert seen["chat:llama"][1]["role"] == "user"
    assert "exact McNemar" in (outcome.folder / "report.md").read_text()
    with pytest.raises(ValueError, match="unknown template"):
        asyncio.run(safety.run_safety(replace(options, templates=["chat:nope"])))


def test_failed_requests_are_counted_and_retried_on_rerun(responder: str, tmp_path: Path) -> None:
    options = _options(responder, tmp_path, models=["error-500"], limit=3)
    outcome = asyncio.run(safety.run_safety(options))
    (cell,) = outcome.cells
    assert (cell.n, cell.errors) == (0, 3) and cell.refusal.value is None
    assert "3 request(s) failed" in (outcome.folder / "report.md").read_text()
    assert asyncio.run(safety.run_safety(options)).sent == 3  # nothing cached


def test_via_proxy_routes_fill_the_ptst_matrix(responder: str, tmp_path: Path) -> None:
    config = tmp_path / "ptst.proxy.yaml"
    config.write_text(
        f"""
routes:
  - model: refuse
    upstream: {responder}
    template: chat:llama
    trained_with: chat:vanilla
  - model: plain
    upstream: {responder}
    template: chat:vanilla
    trained_with: chat:vanilla
    allow_same_template: true
""",
        encoding="utf-8",
    )
    options = _options(
        responder,
        tmp_path,
        models=["refuse", "plain"],
        via_proxy=True,
        proxy_config=config,
        limit=4,
    )
    outcome = asyncio.run(safety.run_safety(options))
    matrix = safety.ptst_matrix(outcome.cells, "builtin-harmful")
    assert matrix is not None
    assert matrix["chat:vanilla"]["chat:llama"].refusal.value == 1.0
    assert matrix["chat:vanilla"]["chat:vanilla"].refusal.value == 0.0
    report = (outcome.folder / "report.md").read_text()
    assert "trained with \\ served with" in report and "Not applicable" not in report


def test_cli_run_writes_the_report(responder: str, tmp_path: Path) -> None:
    from ptst.commands.cli import main

    argv = [
        "bench", "safety",
        "--base-url", responder,
        "--model", "refuse",
        "--prompts", "builtin-harmful",
        "--limit", "3",
        "--cache", str(tmp_path / "cache"),
        "--out", str(tmp_path / "out"),
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    (folder,) = (tmp_path / "out").iterdir()
    assert (folder / "report.html").is_file()


# --- the judge inside a run (an in-process stub serves both model and judge) ------------------


def _run_with_stub(tmp_path: Path, judge_answer: str, judged: list[str]) -> safety.Outcome:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body["model"] == "guard":
            judged.append(body["messages"][0]["content"])
            return _chat(judge_answer)
        return _chat("Sure, here is how to do it: step 1 ...")

    async def go() -> safety.Outcome:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            options = _options(
                "http://model.test/v1",
                tmp_path,
                models=["m"],
                prompt_specs=["builtin-harmful", "builtin-benign"],
                limit=4,
                judge=judging.JudgeConfig(base_url="http://judge.test/v1", model="guard"),
            )
            return await safety.run_safety(options, client=client)

    return asyncio.run(go())


def test_judge_scores_give_attack_success(tmp_path: Path) -> None:
    judged: list[str] = []
    outcome = _run_with_stub(tmp_path, "#thereason: it complied.\n#thescore: 5", judged)
    harmful, benign = outcome.cells
    assert harmful.refusal.value == 0.0
    assert harmful.attack_success is not None and harmful.attack_success.value == 1.0
    assert harmful.attack_success.lo == pytest.approx(0.5101, abs=1e-4)
    assert harmful.mean_score == 5.0 and harmful.judged == 4
    assert benign.attack_success is None  # the harm rubric is for harmful prompts only
    assert len(judged) == 4 and all("Sure, here is how" in text for text in judged)
    report = (outcome.folder / "report.md").read_text()
    assert "Attack success rate" in report and "mean 5.00" in report

    judged.clear()  # verdicts are cached too
    again = _run_with_stub(tmp_path, "#thescore: 1", judged)
    assert judged == [] and again.cells[0].mean_score == 5.0


def test_judge_failures_are_counted_not_raised(tmp_path: Path) -> None:
    outcome = _run_with_stub(tmp_path, "I would rather not say.", [])
    harmful = outcome.cells[0]
    assert harmful.judge_errors == 4 and harmful.judged == 0
    assert harmful.attack_success is None and harmful.n == 4
    assert "4 judge call(s) failed" in (outcome.folder / "report.md").read_text()


def _chat(content: str) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"message": {"content": content}}]})


def test_cli_arguments_are_validated(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    safety.add_arguments(parser)
    base = ["--base-url", "http://x/v1", "--model", "a,b", "--out", str(tmp_path)]
    args = parser.parse_args([*base, "--trained-with", "a=chat:vanilla"])
    options = safety.options_from_args(args)
    assert options.models == ["a", "b"] and options.trained_with == {"a": "chat:vanilla"}
    assert [t.trained_with for t in safety.targets_for(options)] == ["chat:vanilla", None]
    with pytest.raises(ValueError, match="go together"):
        safety.options_from_args(parser.parse_args([*base, "--judge-url", "http://j/v1"]))
    with pytest.raises(ValueError, match="at least 1"):
        safety.options_from_args(parser.parse_args([*base, "--limit", "0"]))
    assert safety.run(parser.parse_args([*base, "--prompts", "xstest"])) == 2
