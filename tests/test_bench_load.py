"""bench.load, bench.stats, bench.report: pure helpers, and small runs against the responder."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ptst.bench import load, plots, report, stats

# --- stats -----------------------------------------------------------------------------------


def test_percentile_matches_numpy_and_vllm_empty_rule() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0]
    for p in (0, 50, 90, 99, 100):
        assert stats.percentile(values, p) == pytest.approx(np.percentile(values, p))
    assert stats.percentile([], 50) == 0.0
    with pytest.raises(ValueError):
        stats.percentile(values, 101)


def test_summarize_is_ordered_and_scaled() -> None:
    rng = np.random.default_rng(1)
    values = list(rng.exponential(0.1, size=500))
    s = stats.summarize(values, 1000)
    assert s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    assert s["mean"] == pytest.approx(np.mean(values) * 1000)
    assert s["std"] == pytest.approx(np.std(values) * 1000)
    assert s["n"] == 500
    assert stats.summarize([])["p99"] == 0.0


def test_tpot_formula() -> None:
    assert stats.tpot(e2e=1.0, ttft=0.1, output_tokens=10) == pytest.approx(0.1)
    assert stats.tpot(e2e=1.0, ttft=0.1, output_tokens=1) is None
    assert stats.ratio(3.0, 0.0) is None


# --- load helpers ----------------------------------------------------------------------------


def test_poisson_offsets_are_rescaled_like_vllm() -> None:
    times = load.poisson_offsets(200, rate=8.0, seed=3)
    assert times == sorted(times) and times[0] > 0
    assert times[-1] == pytest.approx(200 / 8.0)
    gaps = np.diff([0.0, *times])
    assert np.mean(gaps) == pytest.approx(1 / 8.0, rel=0.01)
    assert load.poisson_offsets(3, math.inf, 0) == [0.0, 0.0, 0.0]
    assert load.poisson_offsets(50, 8.0, seed=3) == load.poisson_offsets(50, 8.0, seed=3)


def test_round_plan_alternates_abba_and_covers_every_prompt() -> None:
    plan = load.round_plan(10, rounds=4, n_targets=2)
    assert [t for t, _ in plan] == [0, 1, 1, 0, 0, 1, 1, 0]
    for target in (0, 1):
        covered = [i for t, part in plan if t == target for i in range(10)[part]]
        assert covered == list(range(10))


def test_payload_carries_fixed_output_length_and_usage_request() -> None:
    target = load.Target("t", "http://x/v1", "m", extra_body={"stop": ["[INST]"]})
    target.prefix_messages = [{"role": "system", "content": "safe"}]
    target.user_format = "Q: {prompt}"
    body = load.build_payload(target, "hi", load.Options("chat", True, 7, True))
    assert body["messages"] == [
        {"role": "system", "content": "safe"},
        {"role": "user", "content": "Q: hi"},
    ]
    assert body["max_tokens"] == 7 and body["ignore_eos"] is True and body["stop"] == ["[INST]"]
    assert body["stream_options"] == {"include_usage": True}
    plain = load.build_payload(load.Target("t", "u", "m"), "hi", load.Options("completions", False))
    assert plain["prompt"] == "hi" and "stream" not in plain
    assert load.Target("t", "http://h:1", "m").v1 == "http://h:1/v1"


def test_synthetic_prompts_use_the_char_approximation() -> None:
    tokens = load.Tokens(None)
    prompts = load.make_prompts(5, 64, tokens, seed=1)
    assert len(set(prompts)) == 5
    assert all(abs(tokens.count(p) - 64) <= 3 for p in prompts)
    assert prompts == load.make_prompts(5, 64, tokens, seed=1)


def test_prompt_files(tmp_path: Path) -> None:
    lines = tmp_path / "p.txt"
    lines.write_text("one\n\ntwo\n")
    assert load.make_prompts(3, 8, load.Tokens(), 0, lines) == ["one", "two", "one"]
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"goal": "a"}\n{"prompt": "b"}\n')
    assert load.read_prompts(rows) == ["a", "b"]


# --- report ----------------------------------------------------------------------------------


def test_run_dir_and_report_files(tmp_path: Path) -> None:
    folder = report.run_dir(tmp_path, "load", "http://127.0.0.1:8080/v1")
    assert folder.name.startswith("load-") and folder.name.endswith("-127-0-0-1-8080-v1")
    assert report.run_dir(tmp_path, "load", "http://127.0.0.1:8080/v1") != folder
    png = plots.plot_cdf(folder / "cdf.png", {"a": [0.1, 0.2, 0.3]}, "TTFT (s)")
    md = "## Numbers\n\n" + report.markdown_table(["x", "y"], [["a|b", 1.23456], ["c", None]])
    html_path = report.write_report(folder, "T", {"v": float("nan"), "p": Path("/x")}, md, [png])
    saved = json.loads((folder / "results.json").read_text())
    run = saved.pop("run")
    assert saved == {"v": None, "p": "/x"}
    assert run["cores"] == os.cpu_count() and run["command"] and run["cpu"]
    text = (folder / "report.md").read_text()
    assert text.startswith("# T") and "![cdf](cdf.png)" in text
    assert "## Run" in text and f"- command: `{run['command']}`" in text
    page = html_path.read_text()
    assert "<h2>Numbers</h2>" in page and "<td>a|b</td>" in page and "<td>1.235</td>" in page
    assert 'src="data:image/png;base64,iVBOR' in page
    assert "cdf.png" not in page.replace('alt="cdf"', "")  # no external image reference


def test_run_info_names_the_command_as_typed() -> None:
    info = report.run_info(["/x/.venv/bin/ptst", "bench", "load", "--model", "a b"])
    assert info["command"] == "ptst bench load --model 'a b'"
    assert report.run_info(["-m", "x"])["command"] == "-m x"


def test_markdown_to_html_blocks() -> None:
    html = report.markdown_to_html(
        "# A <b>\n\ntext `x<y`\nmore\n\n- one\n- **two**\n\n```\nraw <\n```"
    )
    assert "<h1>A &lt;b&gt;</h1>" in html
    assert "<p>text <code>x&lt;y</code> more</p>" in html
    assert "<ul><li>one</li><li><strong>two</strong></li></ul>" in html
    assert "<pre><code>raw &lt;</code></pre>" in html


# --- end to end against the responder --------------------------------------------------------


def run_load(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    load.add_arguments(parser)
    return load.run(parser.parse_args([*argv, "--no-progress"]))


def only_result(out: Path) -> tuple[Path, dict[str, Any]]:
    (folder,) = out.iterdir()
    return folder, json.loads((folder / "results.json").read_text())


def test_load_run_is_consistent(responder_url: str, tmp_path: Path) -> None:
    out = tmp_path / "results"
    argv = ["--base-url", responder_url, "--model", "bench", "--concurrency", "1,4"]
    argv += ["--num-prompts", "12", "--output-len", "8", "--warmup", "1", "--out", str(out)]
    assert run_load(argv) == 0
    folder, data = only_result(out)
    for name in ("results.json", "report.md", "report.html", "ttft_cdf.png", "throughput.png"):
        assert (folder / name).is_file(), name
    assert [e["level"] for e in data["levels"]] == [
        {"kind": "concurrency", "value": 1.0},
        {"kind": "concurrency", "value": 4.0},
    ]
    for entry in data["levels"]:
        target = entry["targets"]["base"]
        s, requests = target["summary"], target["requests"]
        assert s["completed"] == 12 and s["failed"] == 0 and len(requests) == 12
        # the responder returns exactly max_tokens tokens: counted == returned
        assert all(r["output_tokens"] == 8 for r in requests)
        assert s["total_output_tokens"] == 8 * 12
        assert all(len(r["itl"]) == 8 for r in requests)  # role chunk + 8 token chunks
        for r in requests:
            assert 0 < r["ttft"] <= r["e2e"]
            assert r["tpot"] == pytest.approx((r["e2e"] - r["ttft"]) / 7)
            assert r["e2e"] == pytest.approx(r["ttft"] + sum(r["itl"]))
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            m = s[metric]
            assert m["p50"] <= m["p90"] <= m["p99"] <= m["max"]
        assert s["output_throughput"] == pytest.approx(8 * s["request_throughput"])
        assert s["request_throughput"] == pytest.approx(12 / s["duration_s"])
        assert s["ttft_ms"]["p50"] == pytest.approx(
            np.percentile([r["ttft"] for r in requests], 50) * 1000
        )


def test_compare_same_target_twice_gives_ratios_near_one(
    responder_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    argv = ["--base-url", responder_url, "--model", "bench", "--compare", responder_url]
    argv += ["--concurrency", "4", "--num-prompts", "48", "--output-len", "4", "--out", str(out)]
    assert run_load(argv) == 0
    folder, data = only_result(out)
    (entry,) = data["levels"]
    assert set(entry["targets"]) == {"base", "compare"}
    ratios = entry["compare"]["ratio"]
    assert set(ratios) >= {"request_throughput", "ttft_p50", "ttft_p99", "itl_p50", "e2e_p50"}
    # Timing is not asserted (a loaded 2-core box makes any bound flaky): the ratios must be
    # real numbers computed from both targets' own counts.
    assert all(isinstance(v, float) and v > 0 for v in ratios.values()), ratios
    assert entry["targets"]["base"]["summary"]["completed"] == 48
    assert entry["targets"]["compare"]["summary"]["completed"] == 48
    assert set(entry["compare"]["added_ms"]) >= {"ttft_p50", "e2e_p50"}
    assert (folder / "ratios.png").is_file()
    assert "compare vs base" in (folder / "report.md").read_text()


def test_errors_are_counted_with_reasons(responder_url: str, tmp_path: Path) -> None:
    argv = ["--base-url", responder_url, "--model", "error-500", "--num-prompts", "3"]
    assert run_load([*argv, "--warmup", "0", "--out", str(tmp_path)]) == 1
    _, data = only_result(tmp_path)
    s = data["levels"][0]["targets"]["base"]["summary"]
    assert s["completed"] == 0 and s["failed"] == 3
    assert s["errors"] == {"HTTP 500: injected server error": 3}


@pytest.mark.parametrize("model", ["drop-mid-stream", "garbage"])
def test_broken_streams_fail(responder_url: str, tmp_path: Path, model: str) -> None:
    argv = ["--base-url", responder_url, "--model", model, "--num-prompts", "2", "--warmup", "0"]
    assert run_load([*argv, "--out", str(tmp_path)]) == 1
    _, data = only_result(tmp_path)
    assert data["levels"][0]["targets"]["base"]["summary"]["failed"] == 2


@pytest.mark.parametrize("extra", [["--no-stream"], ["--endpoint", "completions"]])
def test_non_streaming_and_completions(
    responder_url: str, tmp_path: Path, extra: list[str]
) -> None:
    argv = ["--base-url", responder_url, "--model", "bench", "--num-prompts", "4"]
    argv += ["--output-len", "5", "--rate", "100", "--out", str(tmp_path), *extra]
    assert run_load(argv) == 0
    _, data = only_result(tmp_path)
    (entry,) = data["levels"]
    assert entry["level"] == {"kind": "rate", "value": 100.0}
    requests = entry["targets"]["base"]["requests"]
    assert [r["output_tokens"] for r in requests] == [5] * 4
    if extra == ["--no-stream"]:
        assert all(r["ttft"] == r["e2e"] and r["itl"] == [] for r in requests)


# --- overhead: the raw generator and the rewrite mirror ----------------------------------------


def test_raw_generator_against_the_responder(responder_url: str) -> None:
    import uvloop

    from ptst.bench import blaster, overhead

    request = blaster.http_request(responder_url, "/chat/completions", overhead.chat_body("x", 4))
    assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    result = uvloop.run(
        overhead.measure_fast(responder_url, responder_url, 4, 2, 0.4, 0.1, tokens=4, rate=200)
    )
    for part in ("loaded", "at_rate", "single"):
        for side in ("direct", "proxy"):
            s = result[part][side]
            assert s["errors"] == 0 and s["requests"] > 10
            assert s["requests"] == len(result[part]["latencies"][side])
            assert s["latency_ms"]["p50"] <= s["latency_ms"]["p99"]
            assert 0 < s["generator_cpu_share"] <= 1.5
    # the open loop offers 200 req/s (Poisson), far below the responder's capacity: it keeps up
    for side in ("direct", "proxy"):
        assert 120 < result["at_rate"][side]["requests_per_s"] < 280
        assert result["at_rate"][side]["requests_per_s"] < result["loaded"][side]["requests_per_s"]


def test_direct_target_mirrors_the_proxy_rewrite() -> None:
    from ptst.bench import overhead

    seen = {
        "model": "bench",
        "messages": [
            {"role": "system", "content": "be safe {not a field}"},
            {"role": "user", "content": f"Question: {overhead.PROBE}"},
        ],
        "max_tokens": 1,
        "stop": ["[INST]"],
        "stream": False,
    }
    target = overhead.direct_target("direct", "http://h/v1", "smollm2", seen, None)
    body = load.build_payload(target, "2+2?", load.Options("chat", True, 64, True))
    assert body["model"] == "smollm2" and body["stop"] == ["[INST]"]
    assert body["messages"] == [seen["messages"][0], {"role": "user", "content": "Question: 2+2?"}]
    assert body["stream"] is True and body["max_tokens"] == 64
    with pytest.raises(RuntimeError, match="prompt mode"):
        overhead.direct_target("d", "u", "m", {"prompt": "x"}, None)


def test_paired_streams_against_the_responder(responder_url: str) -> None:
    from ptst.bench import overhead

    targets = (
        load.Target("direct", responder_url, "bench"),
        load.Target("proxy", responder_url, "bench"),
    )
    prompts = [f"prompt {i}" for i in range(12)]
    opts = load.Options("chat", True, 4, ignore_eos=True)
    res = asyncio.run(overhead.paired_streams(targets, prompts, opts, 4, len))
    assert res["pairs"] == 6 and res["failed_pairs"] == 0
    # the same server on both sides: the paired differences centre near zero
    assert abs(res["ttft_added_ms"]["p50"]) < 50
    assert 0.5 < res["stream_rate_ratio"] < 2
    assert res["ttft_ms"]["direct"]["p50"] > 0 and res["ttft_ms"]["proxy"]["p50"] > 0
