"""What the worker processes of one `ptst serve --workers N` share: a run folder that the parent
creates before it starts them, names in PTST_RUN_DIR and removes when it exits.

    <run>/metrics/   prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR): each
                     worker writes its own, and a scrape of any worker sums them all
    <run>/reload     the reload generation: an explicit reload (SIGHUP to the parent or to a
                     worker, POST /admin/reload to any worker) writes a new token, and every
                     worker's watcher reloads when it sees the token change

A file rather than signals between processes: a worker does not know its siblings, the parent
cannot be told anything but signals, and a file is read by the poll every watcher already runs.
With one worker there is no run folder and none of this is used: one process holds the truth.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

RUN_DIR_ENV = "PTST_RUN_DIR"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
GENERATION = "reload"


def current() -> Path | None:
    """This worker's run folder, or None for a proxy that runs alone."""
    value = os.environ.get(RUN_DIR_ENV)
    return Path(value) if value else None


def metrics_dir(run: Path) -> Path:
    return run / "metrics"


@contextlib.contextmanager
def run_folder() -> Iterator[Path]:
    """A fresh run folder, announced in the environment the workers will inherit (so that
    prometheus_client in each starts in multiprocess mode); removed at exit."""
    run = Path(tempfile.mkdtemp(prefix="ptst-serve-"))
    metrics_dir(run).mkdir()
    saved = {name: os.environ.get(name) for name in (RUN_DIR_ENV, MULTIPROC_ENV)}
    os.environ[RUN_DIR_ENV] = str(run)
    os.environ[MULTIPROC_ENV] = str(metrics_dir(run))
    try:
        yield run
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(run, ignore_errors=True)


def read_generation(run: Path) -> str:
    """The current reload token ("" before the first explicit reload)."""
    try:
        return (run / GENERATION).read_text()
    except OSError:
        return ""


def bump_generation(run: Path) -> str:
    """Write a new reload token (atomically: a reader sees the old one or the new one) and
    return it. A token, not a counter: two writers at once need no lock, any change counts."""
    token = f"{time.time_ns()}-{os.getpid()}"
    tmp = run / f"{GENERATION}.{os.getpid()}.tmp"
    tmp.write_text(token)
    tmp.replace(run / GENERATION)
    return token
