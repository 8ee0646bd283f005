"""The installed package is what the other tests test: build the wheel, install it into a fresh
virtual environment outside the checkout, and run `ptst` from there (shipped templates, the
proxy, the fast overhead bench). Nothing of the checkout is importable in that environment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.servers import ROOT, free_port, start_server

INSTALL_TIMEOUT_S = 900


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with the wheel and its `bench` extra; yields its bin/ folder."""
    outside = tmp_path_factory.mktemp("wheel")
    dist = outside / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
        outside,
    )
    (wheel,) = dist.glob("ptst_proxy-*.whl")
    venv = outside / "venv"
    run([sys.executable, "-m", "venv", str(venv)], outside)
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
    ]
    constraints = ["-c", str(ROOT / "constraints.txt")]
    run([*pip, *constraints, f"{wheel}[bench]"], outside, timeout=INSTALL_TIMEOUT_S)
    yield venv / "bin"


def test_wheel_holds_one_import_root(installed: Path, tmp_path: Path) -> None:
    python = str(installed / "python")
    code = "import ptst.proxy.app, ptst.bench.overhead, ptst.engine.backend, ptst.commands.cli"
    run([python, "-c", code], tmp_path)
    for name in ("proxy", "bench", "engine", "commands", "templates", "tune"):
        out = subprocess.run([python, "-c", f"import {name}"], cwd=tmp_path, capture_output=True)
        assert out.returncode != 0, f"the wheel installs a top-level {name!r}"
    where = run([python, "-c", "import ptst; print(ptst.__file__)"], tmp_path).stdout
    assert str(ROOT) not in where and "site-packages" in where


def test_templates_list_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    out = run([str(installed / "ptst"), "templates", "list"], tmp_path).stdout
    for name in ("chat:llama", "chat:vanilla", "text:alpaca", "chatml:llama"):
        assert name in out


def test_serve_from_the_wheel_with_shipped_templates(installed: Path, tmp_path: Path) -> None:
    port = free_port()
    config = {  # no templates_dir: the shipped templates
        "server": {"host": "127.0.0.1", "port": port},
        "routes": [{"model": "m", "upstream": "http://127.0.0.1:9/v1", "template": "chat:llama"}],
        "log": {"jsonl": str(tmp_path / "refusals.jsonl")},
    }
    path = tmp_path / "ptst.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cmd = [str(installed / "ptst"), "serve", "--config", str(path)]
    with start_server("wheel-serve", cmd, tmp_path, env=env) as server:
        server.wait_http(f"http://127.0.0.1:{port}/v1/models", timeout=60)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["m"]
        # the upstream is down: an OpenAI-shaped 503, from the installed proxy
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert reply.status_code in (502, 503) and "error" in reply.json()


def test_overhead_bench_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    cmd = [
        str(installed / "ptst"),
        *("bench", "overhead", "--setting", "fast", "--rounds", "1", "--round-seconds", "0.5"),
        *("--rate", "200", "--connections", "4", "--out", str(tmp_path / "results")),
    ]
    run(cmd, tmp_path, timeout=300)
    (folder,) = (tmp_path / "results").iterdir()
    assert (folder / "results.json").is_file() and (folder / "report.md").is_file()
