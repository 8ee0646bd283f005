"""Swap templates and config without a restart: a file watch (mtime poll), SIGHUP, or
POST /admin/reload. A broken file is logged and the last good snapshot keeps serving; requests
in flight keep the snapshot they started with."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from ptst.proxy.state import ProxyState, SnapshotError, build_snapshot

log = logging.getLogger("ptst.reload")


class Reloader:
    def __init__(self, state: ProxyState, config_path: Path | None) -> None:
        self.state = state
        self.config_path = config_path
        self._seen = self._fingerprint()
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

    async def reload(self) -> str | None:
        """Rebuild the snapshot; returns None on success, else the error (old set stays live)."""
        async with self._lock:
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
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        try:
            while True:
                interval = self.state.snapshot.settings.reload_interval_s
                await asyncio.sleep(interval or 1.0)
                if not interval:
                    continue
                current = await asyncio.to_thread(self._fingerprint)
                if current != self._seen:
                    self._seen = current
                    await self.reload()
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)
