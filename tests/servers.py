"""Real servers for the tests: `ptst.engine.process.Child` processes on free loopback ports, each
copying its output to a log file in the session's log folder, stopped in teardown."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ptst.engine.process import Child, free_port

ROOT = Path(__file__).resolve().parent.parent
PTST = [sys.executable, "-m", "ptst"]

__all__ = ["PTST", "ROOT", "Child", "free_port", "start_server"]


def start_server(
    name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None
) -> Child:
    return Child(
        name,
        cmd,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        log_file=log_dir / f"{name}.log",
    )
