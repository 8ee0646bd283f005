"""`ptst serve --workers N`: uvicorn's process supervisor, changed where a proxy whose workers
share one run folder (proxy/workers.py) needs it:

- SIGHUP reloads config and templates in every worker (it writes the run folder's reload
  generation, which each worker's watcher reads), where uvicorn would restart each worker in
  turn: a restart ends the streams of the worker it replaces at the shutdown deadline, and
  loads the second stage's model again;
- a worker that exited is marked dead for prometheus_client, so that its live gauges (requests
  in flight) leave the sums while its counters stay in them;
- on SIGTERM the parent closes its own copy of the listening socket before it stops the
  workers, so that once they have closed theirs a new connection is refused rather than left
  waiting in the kernel's backlog.

Everything else (starting, pinging, replacing hung workers, SIGTERM/SIGINT) is uvicorn's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from socket import socket

from prometheus_client.multiprocess import mark_process_dead
from uvicorn.config import Config
from uvicorn.supervisors.multiprocess import Multiprocess

from ptst.proxy import workers

logger = logging.getLogger("uvicorn.error")


class Supervisor(Multiprocess):
    def __init__(self, config: Config, sockets: list[socket], run_dir: Path) -> None:
        super().__init__(config, sockets)
        self.run_dir = run_dir

    def _pids(self) -> set[int]:
        return {p.pid for p in self.processes if p.pid is not None}

    def _mark_dead(self, pids: set[int]) -> None:
        for pid in pids:
            mark_process_dead(pid, str(workers.metrics_dir(self.run_dir)))

    def keep_subprocess_alive(self) -> None:
        before = self._pids()
        super().keep_subprocess_alive()
        self._mark_dead(before - self._pids())

    def handle_signals(self) -> None:  # SIGTTOU retires a worker
        before = self._pids()
        super().handle_signals()
        self._mark_dead(before - self._pids())

    def handle_hup(self) -> None:
        logger.info("Received SIGHUP: every worker reloads its config and templates.")
        workers.bump_generation(self.run_dir)

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().terminate_all()


def serve(config: Config, run_dir: Path) -> None:
    """What `uvicorn.run` does for several workers, with this supervisor."""
    sock = config.bind_socket()
    try:
        Supervisor(config, [sock], run_dir).run()
    except KeyboardInterrupt:
        pass
