"""`ptst backend` fails fast and clean: one clear line, non-zero exit, no process left behind."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from ptst.engine.backend import BackendConfig, cpu_dtype, vllm_command
from tests.servers import PTST, ROOT, free_port


def run_backend(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    proc = subprocess.run(
        [*PTST, "backend", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    return proc, time.monotonic() - start


def leftovers(marker: str) -> list[str]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if marker in cmdline:
            found.append(cmdline)
    return found


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("ptst backend:")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_missing_model_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    proc, took = run_backend("--model", str(missing), "--port", str(free_port()))
    assert proc.returncode != 0
    assert took < 60
    assert error_line(proc.stderr) == f"ptst backend: model folder {missing} does not exist"
    assert not leftovers(str(missing))


def test_port_already_taken(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc, took = run_backend("--model", str(model), "--port", str(port))
    assert proc.returncode != 0
    assert took < 60
    assert error_line(proc.stderr) == f"ptst backend: port {port} on 127.0.0.1 is already in use"
    assert not leftovers(str(model))


@pytest.mark.vllm
def test_vllm_start_failure_reports_reason(tmp_path: Path) -> None:
    """A folder vLLM cannot load: vLLM itself fails; we report why and clean up."""
    model = tmp_path / "broken-model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"architectures": ["NoSuchArchitecture"], "model_type": "nope"})
    )
    proc, _ = run_backend("--model", str(model), "--port", str(free_port()), timeout=300)
    assert proc.returncode != 0, proc.stderr[-2000:]
    line = error_line(proc.stderr)
    assert "vLLM exited with code" in line and "before it was ready" in line
    assert not leftovers(str(model))


def test_cpu_dtype_follows_the_cpu_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_dtype(info) == "bfloat16"
    info.write_text("flags\t\t: fpu avx2\n")
    assert cpu_dtype(info) == "float32"


def test_vllm_command_shape(tmp_path: Path) -> None:
    cfg = BackendConfig(
        model=tmp_path,
        served_model_name="m",
        port=1234,
        max_model_len=512,
        extra_args=["--seed", "1"],
    )
    cmd = vllm_command(cfg)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--served-model-name") + 1] == "m"
    assert cmd[cmd.index("--max-model-len") + 1] == "512"
    assert cmd[-2:] == ["--seed", "1"]
