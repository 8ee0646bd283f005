"""`ptst up` routes: the base model's, and one per LoRA adapter with `trained_with` read from the
adapter's manifest; the PTST guard refuses a route before vLLM starts."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from ptst.engine import up
from ptst.proxy.config import ConfigError
from ptst.tune.manifest import DataInfo, LoraInfo, Manifest, now, write_manifest
from tests.servers import PTST, ROOT

URL = "http://127.0.0.1:8000/v1"


def adapter(folder: Path, template: str) -> Path:
    folder.mkdir(parents=True)
    write_manifest(
        folder,
        Manifest(
            base="/models/base",
            base_name="base",
            template=template,
            mode="messages",
            data=DataInfo(path="gsm8k.jsonl", sha256="0" * 64, rows=10, used=10),
            steps=1,
            max_steps=1,
            batch_size=1,
            lr=1e-4,
            max_length=512,
            lora=LoraInfo(r=8, alpha=16, dropout=0.0, targets=["q_proj"]),
            seed=0,
            dtype="float32",
            device="cpu",
            started=now(),
            ptst_version="test",
        ),
    )
    return folder


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_each_adapter_gets_its_route_with_trained_with_from_its_manifest(tmp_path: Path) -> None:
    vanilla = adapter(tmp_path / "gsm-vanilla", "chat:vanilla")
    llama = adapter(tmp_path / "gsm-llama", "chat:llama")
    args = parse(
        *("--model", str(tmp_path), "--lora", f"vanilla={vanilla}", "--lora", f"llama={llama}"),
        *("--route-template", "llama=chat:llama-short"),
    )
    routes = up.up_routes(args, URL, "base", tmp_path)
    assert [(r["model"], r["upstream_model"], r["template"]) for r in routes] == [
        ("demo", "base", "chat:llama"),
        ("vanilla", "vanilla", "chat:llama"),
        ("llama", "llama", "chat:llama-short"),
    ]
    assert "trained_with" not in routes[0]
    assert routes[1]["trained_with"] == "chat:vanilla"
    assert routes[2]["trained_with"] == "chat:llama"
    assert all(r["tokenizer"] == str(tmp_path.resolve()) for r in routes)


def test_the_ptst_guard_applies_per_adapter_route(tmp_path: Path) -> None:
    llama = adapter(tmp_path / "gsm-llama", "chat:llama")
    argv = ("--model", str(tmp_path), "--lora", f"llama={llama}", "--state-dir", str(tmp_path))
    with pytest.raises(ConfigError, match="trained_with"):
        up.write_up_config(parse(*argv), URL, "base", tmp_path)
    path = up.write_up_config(parse(*argv, "--allow-same-template"), URL, "base", tmp_path)
    assert path.is_file()


def test_route_template_must_name_a_route(tmp_path: Path) -> None:
    args = parse("--model", str(tmp_path), "--route-template", "nope=chat:mpt")
    with pytest.raises(ConfigError, match="nope"):
        up.up_routes(args, URL, "base", tmp_path)


def test_ptst_up_refuses_before_starting_vllm(tmp_path: Path) -> None:
    llama = adapter(tmp_path / "gsm-llama", "chat:llama")
    cmd = [*PTST, "up", "--model", str(tmp_path), "--lora", f"llama={llama}"]
    out = subprocess.run(
        [*cmd, "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("ptst up: ") and "trained_with" in out.stderr
    assert "vllm" not in out.stderr.lower()  # refused before vLLM was started
