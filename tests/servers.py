"""Real servers for the tests: `ptst.engine.process.Child` processes on free loopback ports, each
copying its output to a log file in the session's log folder, stopped in teardown."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ptst.engine.process import Child, free_port

ROOT = Path(__file__).resolve().parent.parent
PTST = [sys.executable, "-m", "ptst"]

__all__ = ["PTST", "ROOT", "Child", "free_port", "run_dir_of", "start_server", "worker_pids"]


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


def worker_pids(pid: int) -> list[int]:
    """The worker processes (multiprocessing spawn children) of a `ptst serve --workers N`."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def run_dir_of(pid: int) -> str | None:
    """The run folder a `ptst serve` worker shares with its siblings (PTST_RUN_DIR)."""
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(b"PTST_RUN_DIR="):
            return item.split(b"=", 1)[1].decode()
    return None
