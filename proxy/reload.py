"""Swap templates and config without a restart: a file watch (mtime poll), SIGHUP, or
POST /admin/reload. A broken file is logged and the last good snapshot keeps serving; requests
in flight keep the snapshot they started with.

With several workers each one watches the files itself; an explicit reload (SIGHUP, the admin
endpoint) also writes the run folder's reload generation (proxy/workers.py), which every
worker's watcher checks on each tick, so it reaches all of them within one tick."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from ptst.proxy import workers
from ptst.proxy.state import ProxyState, SnapshotError, build_snapshot

log = logging.getLogger("ptst.reload")


class Reloader:
    def __init__(
        self, state: ProxyState, config_path: Path | None, run_dir: Path | None = None
    ) -> None:
        self.state = state
        self.config_path = config_path
        self.run_dir = run_dir  # shared with the other workers of one `ptst serve`, if any
        self._seen = self._fingerprint()
        self._generation = workers.read_generation(run_dir) if run_dir else ""
        self._lock = asyncio.Lock()

    def _watched(self) -> list[Path]:
        paths = [self.config_path] if self.config_path else []
        folder = self.state.snapshot.settings.templates_dir
        with contextlib.suppress(OSError):
            paths += sorted(folder.iterdir())
        return paths

    def _fingerprint(self) -> tuple[tuple[str, float, int], ...]:
        out = []
        for path in self._watched():
            with contextlib.suppress(OSError):
                st = path.stat()
                out.append((str(path), st.st_mtime, st.st_size))
        return tuple(out)

    async def reload(self, everywhere: bool = False) -> str | None:
        """Rebuild the snapshot; returns None on success, else the error (old set stays live).
        `everywhere`: the other workers reload too (at their watcher's next tick)."""
        async with self._lock:
            if everywhere and self.run_dir is not None:
                self._generation = workers.bump_generation(self.run_dir)
            old = self.state.snapshot
            try:
                snapshot = await asyncio.to_thread(build_snapshot, old.settings, self.config_path)
            except SnapshotError as exc:
                log.error("reload failed, still serving the previous templates and config: %s", exc)
                self.state.metrics.on_template_reload(False)
                return str(exc)
            if snapshot.settings.server != old.settings.server:
                log.warning("server settings changed in the config: they take effect on restart")
            self.state.snapshot = snapshot
            self._seen = self._fingerprint()
            self.state.metrics.on_template_reload(True)
            log.info(
                "reloaded: %d routes, %d templates",
                len(snapshot.settings.routes),
                len(snapshot.templates),
            )
            return None

    async def watch(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(
                signal.SIGHUP, lambda: asyncio.ensure_future(self.reload(everywhere=True))
            )
        try:
            while True:
                interval = self.state.snapshot.settings.reload_interval_s
                await asyncio.sleep(interval or 1.0)
                if self.run_dir is not None:
                    generation = workers.read_generation(self.run_dir)
                    if generation != self._generation:
                        self._generation = generation
                        await self.reload()
                        continue
                if not interval:
                    continue
                current = await asyncio.to_thread(self._fingerprint)
                if current != self._seen:
                    self._seen = current
                    await self.reload()
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)
