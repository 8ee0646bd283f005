"""The one subprocess supervisor: every server this project starts (vLLM, `ptst serve`, the bench
responder, the tests' servers) runs as a `Child`.

A child gets its own session, so stopping it stops its whole process group (vLLM's engine
processes included): SIGTERM, then SIGKILL for whatever is left after a timeout. Its output is
read by a thread, kept (the last lines, for error messages), and optionally echoed with a prefix
or copied to a log file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import httpx


class ChildError(RuntimeError):
    """A child did not come up; the message ends with its last lines of output."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on `host` a moment ago (the usual race applies)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Child:
    """A running child process. Use as a context manager, or call `stop()`."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        echo_prefix: str | None = None,
        log_file: Path | None = None,
        keep: int = 300,
        ready_marker: str = "READY http",
    ) -> None:
        self.name = name
        self.lines: deque[str] = deque(maxlen=keep)
        self.echo_prefix = echo_prefix
        self.log_file = log_file
        self.ready_marker = ready_marker
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: stop() takes its children with it
        )
        self._reader = threading.Thread(target=self._pump, name=f"{name}-output", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        log = self.log_file.open("a") if self.log_file is not None else None
        try:
            for raw in self.proc.stdout:
                line = raw.rstrip("\n")
                self.lines.append(line)
                if (
                    self.echo_prefix is not None
                ):  # one write a line: other writers never land mid-line
                    sys.stderr.write(f"{self.echo_prefix}{line}\n")
                    sys.stderr.flush()
                if log is not None:
                    log.write(raw)
                    log.flush()
                if self.ready_marker in line:
                    self._ready.set()
        finally:
            if log is not None:
                log.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def tail(self, n: int = 25) -> str:
        return "\n".join(list(self.lines)[-n:])

    def failure(self, what: str) -> ChildError:
        if self.proc.poll() is not None:
            self._reader.join(timeout=2)  # its last words
        return ChildError(
            f"{self.name} {what} (exit code {self.proc.poll()}); last output:\n{self.tail()}"
        )

    def wait_line(self, timeout: float) -> None:
        """Wait until a line holds the ready marker (`READY http...` by default)."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise self.failure(f"did not print {self.ready_marker!r}")

    def wait_http(
        self,
        url: str,
        timeout: float,
        ok: Callable[[int], bool] = lambda status: status < 500,
        interval: float = 0.1,
    ) -> None:
        """Wait until `url` answers with a status `ok` accepts; fail early if the child exits."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=httpx.Timeout(2.0)) as client:
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    if ok(client.get(url).status_code):
                        return
                time.sleep(interval)
        raise self.failure(f"did not answer {url}")

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the child itself (not its group)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the child's group, SIGKILL what is left after `timeout` s; its exit code."""
        if self.proc.poll() is None:
            signal_group(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        # Grandchildren left in the group after the child exited, or a child that hung.
        signal_group(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=60)  # a killed process still has to release its memory
        self._reader.join(timeout=5)
        return self.proc.returncode

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Turn SIGTERM (and SIGHUP) into KeyboardInterrupt so `with` blocks clean up."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
