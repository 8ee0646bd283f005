"""The servers a bench starts for itself on free loopback ports, and stops: `bench.responder`
and `ptst serve` (one worker), each a child process in its own session whose output is kept
for error messages."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """A child process in its own session; its output is kept for error messages."""

    def __init__(self, name: str, cmd: Sequence[str]) -> None:
        self.name = name
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen(
            list(cmd),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            del self.lines[:-50]
            if line.startswith("READY"):
                self.ready.set()

    def fail(self, what: str) -> RuntimeError:
        tail = "\n".join(self.lines[-20:])
        return RuntimeError(f"{self.name} {what} (exit {self.proc.poll()}):\n{tail}")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise self.fail("did not print READY")

    def wait_http(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1.0).status_code < 500:
                    return
            time.sleep(0.1)
        raise self.fail(f"did not answer {url}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._thread.join(timeout=5)


@contextlib.contextmanager
def responder(tokens: int = 16) -> Iterator[str]:
    """Run bench.responder on a free port; yield its base URL (…/v1)."""
    port = free_port()
    cmd = [sys.executable, "-m", "bench.responder", "--port", str(port), "--tokens", str(tokens)]
    proc = Process("responder", cmd)
    try:
        proc.wait_ready(30)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.stop()


def proxy_config(routes: list[dict[str, Any]], port: int, folder: Path) -> dict[str, Any]:
    """A proxy config with audit logs in a temporary folder (see proxy/config.py)."""
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "templates_dir": str(ROOT / "templates"),
        "routes": routes,
        "log": {
            "jsonl": str(folder / "refusals.jsonl"),
            "sqlite": str(folder / "refusals.sqlite3"),
        },
    }


@contextlib.contextmanager
def proxy(routes: list[dict[str, Any]]) -> Iterator[str]:
    """Run `ptst serve` (one worker) with these routes on a free port; yield its base URL."""
    with tempfile.TemporaryDirectory(prefix="ptst-overhead-") as tmp:
        folder = Path(tmp)
        port = free_port()
        path = folder / "ptst.yaml"
        path.write_text(yaml.safe_dump(proxy_config(routes, port, folder)))
        cmd = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(path)]
        proc = Process("proxy", [*cmd, "--workers", "1", "--log-level", "warning"])
        try:
            proc.wait_http(f"http://127.0.0.1:{port}/v1/models", 60)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.stop()
