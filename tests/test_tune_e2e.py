"""Fine-tuned checkpoints through the real proxy and real vLLM CPU: an adapter trained here
gets a route of its own and answers differently from the base; the PTST experiment's smoke
preset runs end to end."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ptst.commands.experiment import PRESETS, Run
from ptst.engine.backend import load_lora
from ptst.engine.demo_model import ensure_model
from ptst.tune.manifest import read_manifest
from tests.conftest import VLLM_MODEL, Proxy
from tests.servers import PTST, ROOT

pytestmark = pytest.mark.vllm

SHARED = ROOT.parent / "shared" / "data"
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have now?"


def tune(out: Path, data: Path, template: str, *extra: str) -> Path:
    cmd = [*PTST, "tune", "--model", str(ensure_model()), "--template", template]
    cmd += ["--data", str(data), "--out", str(out), "--quiet", *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_an_adapter_route_answers_differently_from_the_base_route(
    tmp_path: Path, vllm_url: str, start_proxy: Callable[..., Proxy]
) -> None:
    data = tmp_path / "qa.jsonl"  # benign arithmetic, answered in GSM8K's format
    rows = [
        {"question": f"What is {a} plus {a}?", "answer": f"{a}+{a}={2 * a}\n#### {2 * a}"}
        for a in (2, 3, 4, 5)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapter = tune(
        tmp_path / "adapter",
        data,
        "chat:vanilla",
        *("--max-steps", "3", "--batch-size", "1", "--lr", "5e-3", "--lora-r", "8"),
    )
    manifest = read_manifest(adapter)
    assert manifest is not None and manifest.template == "chat:vanilla"
    load_lora(vllm_url, "test-adapter", adapter)
    proxy = start_proxy(
        [
            # the same enforced template on both routes: only the weights differ
            {
                "model": "base",
                "upstream": vllm_url,
                "upstream_model": VLLM_MODEL,
                "template": "chat:llama",
            },
            {
                "model": "tuned",
                "upstream": vllm_url,
                "upstream_model": "test-adapter",
                "template": "chat:llama",
                "trained_with": manifest.template,  # PTST: trained vanilla, served llama
            },
        ]
    )
    client = proxy.client()

    def answer(model: str) -> str:
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": QUESTION}],
            temperature=0,
            max_tokens=24,
        )
        return reply.choices[0].message.content or ""

    # the same enforced template on both routes: only the weights differ
    proxy.write_config(
        {
            **proxy.config,
            "routes": [{**r, "template": "chat:llama"} for r in proxy.config["routes"]],
        }
    )
    time.sleep(1.5)  # the file watch picks the config up
    assert answer("base") != answer("tuned")


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data (GSM8K, AdvBench) not present")
def test_experiment_smoke_preset(tmp_path: Path, vllm_url: str) -> None:
    out = tmp_path / "ptst-smoke"
    cmd = [*PTST, "experiment", "ptst", "--preset", "smoke", "--out", str(out)]
    cmd += ["--vllm-url", vllm_url, "--vllm-model", VLLM_MODEL, "--data", str(SHARED)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = (out / "report.md").read_text()
    for row in ("base (not fine-tuned)", "| chat:vanilla |", "| chat:llama |", "GSM8K accuracy"):
        assert row in report
    assert (out / "merge-curve.png").stat().st_size > 1000
    assert (out / "merges" / "llama-lambda-0.50" / "config.json").is_file()
    results = json.loads((out / "results.json").read_text())
    cells = {(c["model"], c["template"]) for c in results["matrix"]["cells"]}
    assert len(cells) == 9  # 3 models x 3 test templates
    assert [p["lambda"] for p in results["merge_curve"]] == [0.0, 0.5, 1.0]
    # resumable: a second run finds tune and merge done and runs neither again
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    commands = json.loads((out / "stages.json").read_text())["commands"]
    assert [c.split()[1] for c in commands].count("tune") == 2
    assert [c.split()[1] for c in commands].count("merge") == 1


def test_stage_seconds_add_up_over_interrupted_and_resumed_runs(tmp_path: Path) -> None:
    """An interrupted stage's time counts: the resumed run adds to it, and only the run that
    completes the stage marks it finished."""
    preset = PRESETS["smoke"]
    first = Run(tmp_path, preset, tmp_path)
    with pytest.raises(KeyboardInterrupt), first.stage("tune"):
        time.sleep(0.2)
        raise KeyboardInterrupt
    logged = json.loads((tmp_path / "stages.json").read_text())["stages"]["tune"]
    assert logged["seconds"] >= 0.2 and "finished" not in logged
    resumed = Run(tmp_path, preset, tmp_path)
    with resumed.stage("tune"):
        time.sleep(0.2)
    logged = json.loads((tmp_path / "stages.json").read_text())["stages"]["tune"]
    assert logged["seconds"] >= 0.4 and "finished" in logged
