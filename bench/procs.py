"""The servers a bench starts for itself on free loopback ports, and stops: `ptst.bench.responder`
and `ptst serve` (one worker), each a `ptst.engine.process.Child`."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ptst.engine.process import Child, free_port
from ptst.proxy.config import build_config, write_config


@contextlib.contextmanager
def responder(tokens: int = 16, fault: str | None = None) -> Iterator[str]:
    """Run the bench responder on a free port; yield its base URL (…/v1). With `fault`, every
    request is answered as that model would be (a failing replica)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "ptst.bench.responder",
        "--port",
        str(port),
        "--tokens",
        str(tokens),
        *(["--fault", fault] if fault else []),
    ]
    with Child("responder", cmd, keep=50) as child:
        child.wait_line(30)
        yield f"http://127.0.0.1:{port}/v1"


@contextlib.contextmanager
def proxy(routes: list[dict[str, Any]]) -> Iterator[str]:
    """Run `ptst serve` (one worker) with these routes on a free port; yield its base URL."""
    with tempfile.TemporaryDirectory(prefix="ptst-overhead-") as tmp:
        folder = Path(tmp)
        port = free_port()
        config = build_config(routes, port=port, log_dir=folder)
        path = write_config(folder / "ptst.yaml", config)
        cmd = [sys.executable, "-m", "ptst", "serve", "--config", str(path)]
        with Child("proxy", [*cmd, "--workers", "1", "--log-level", "warning"], keep=50) as child:
            child.wait_http(f"http://127.0.0.1:{port}/v1/models", 60)
            yield f"http://127.0.0.1:{port}/v1"
