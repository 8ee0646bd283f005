"""Both benches end to end against the real vLLM CPU demo and the proxy in front of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ptst.commands.cli import main
from tests.conftest import Proxy

pytestmark = pytest.mark.vllm


def only_result(out: Path) -> tuple[Path, dict]:  # type: ignore[type-arg]
    (folder,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    return folder, json.loads((folder / "results.json").read_text())


def test_load_bench_direct_vs_proxy(vllm_url: str, demo_proxy: Proxy, tmp_path: Path) -> None:
    from ptst.engine.demo_model import ensure_model

    argv = [
        "bench", "load", "--base-url", vllm_url, "--model", "smollm2",
        "--compare", demo_proxy.base_url, "--compare-model", "demo",
        "--tokenizer", str(ensure_model()), "--concurrency", "2", "--num-prompts", "4",
        "--input-len", "16", "--output-len", "8", "--ignore-eos", "--warmup", "1",
        "--rounds", "2", "--out", str(tmp_path), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    folder, data = only_result(tmp_path)
    (entry,) = data["levels"]
    for name in ("base", "compare"):
        s, requests = entry["targets"][name]["summary"], entry["targets"][name]["requests"]
        assert s["completed"] == 4 and s["failed"] == 0
        assert all(r["output_tokens"] == 8 for r in requests)  # ignore_eos: counted == asked
        assert s["total_output_tokens"] == 32
        assert s["ttft_ms"]["p50"] <= s["ttft_ms"]["p99"]
        assert s["e2e_ms"]["p50"] <= s["e2e_ms"]["p99"]
    assert entry["compare"]["ratio"]["request_throughput"] > 0
    assert (folder / "report.html").is_file()


def test_safety_bench_through_the_proxy(demo_proxy: Proxy, tmp_path: Path) -> None:
    argv = [
        "bench", "safety", "--base-url", demo_proxy.base_url, "--via-proxy",
        "--model", "demo,fake-refuse", "--prompts", "builtin-harmful", "--limit", "3",
        "--max-tokens", "8", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    folder, _ = only_result(tmp_path / "out")
    report = (folder / "report.md").read_text()
    assert "demo" in report and "fake-refuse" in report
    # the always-refusing upstream behind the proxy: 3/3 refusals with the 95% Wilson interval
    assert "1.000 [0.439, 1.000] (3/3)" in report
    assert (folder / "report.html").is_file()
