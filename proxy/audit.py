"""The refusal log: one record per request, written off the hot path to JSONL and SQLite.

    handler --submit()--> bounded asyncio.Queue --one writer task--> sink thread
                                                                     ├── JsonlSink   (size rotation)
                                                                     └── SqliteSink  (WAL, one
                                                                          transaction per batch)

`submit` never blocks and never raises. Nothing is lost silently: a full queue, a failing sink
and a shutdown that runs out of time each count the lost records in
`ptst_log_records_dropped_total{reason,sink}`; a failing sink is logged once per failure streak,
is retried with the next batch, and never stops the other sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, get_type_hints

from ptst.proxy import jsonfast
from ptst.proxy.config import LogSettings
from ptst.proxy.record import FIELDS, LogRecord, record_row

if TYPE_CHECKING:
    from ptst.proxy.metrics import Metrics

logger = logging.getLogger(__name__)

MAX_BATCH = 512
# The writer waits this long after the first record of a batch, so that under load one thread
# hop and one transaction serve many records instead of one each.
BATCH_WINDOW_S = 0.05
DROP_WARNING_INTERVAL_S = 10.0


class Sink(Protocol):
    """A synchronous destination for batches; called from the log's own thread only."""

    name: str

    def open(self) -> None:
        """Open files or connections now (writes reopen them after a failure)."""

    def write(self, batch: Sequence[LogRecord]) -> None:
        """Write all records or raise `SinkError` saying how many were lost."""

    def close(self) -> None: ...


class SinkError(Exception):
    def __init__(self, lost: int, cause: BaseException) -> None:
        super().__init__(f"{lost} record(s) lost: {cause}")
        self.lost = lost
        self.cause = cause


class JsonlSink:
    """Appends one JSON object per line; rotates `x.jsonl` -> `x.jsonl.1` ... `.{keep}` by size.

    Safe with several worker processes on one file (`ptst serve --workers N`): a batch is
    written under an exclusive lock on `x.jsonl.lock`, which first takes the file's size (and
    a rotation by another worker) from the disk, in whole lines with unbuffered appends; so
    lines never interleave, and two workers crossing the limit together rotate once.
    """

    name = "jsonl"

    def __init__(self, path: Path, rotate_bytes: int, rotate_keep: int) -> None:
        self.path = path
        self.rotate_bytes = rotate_bytes
        self.rotate_keep = rotate_keep
        self._file: IO[bytes] | None = None
        self._size = 0
        self._lock: IO[bytes] | None = None

    def open(self) -> None:
        self._open()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._lock is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path.with_name(self.path.name + ".lock"), "ab")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = open(self.path, "ab", buffering=0)  # kept open across batches
            self._size = file.tell()
            if self._size and not _ends_with_newline(self.path):
                file.write(b"\n")  # a line cut short by an earlier failure stays on its own
                self._size += 1
            self._file = file
        return self._file

    def _follow_external_changes(self) -> None:
        """Reopen if the file was moved away (another worker or logrotate rotated it); take the
        size from the disk, so several processes appending to one file rotate it on time."""
        if self._file is None:
            return
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            self._close_file()
            return
        if on_disk.st_ino != os.fstat(self._file.fileno()).st_ino:
            self._close_file()
        else:
            self._size = on_disk.st_size

    def _rotate(self) -> None:
        self._close_file()
        for i in range(self.rotate_keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def write(self, batch: Sequence[LogRecord]) -> None:
        lines = [jsonfast.dumps(record.to_dict()) + b"\n" for record in batch]
        done = 0  # records known to be in the OS
        try:
            with self._locked():
                self._follow_external_changes()
                while done < len(lines):
                    file = self._open()  # also the size, if another worker rotated the file
                    if self._size and self._size + len(lines[done]) > self.rotate_bytes:
                        self._rotate()
                        file = self._open()
                    # the lines that fit before the rotation size, at least one
                    room, end = self.rotate_bytes - self._size - len(lines[done]), done + 1
                    while end < len(lines) and len(lines[end]) <= room:
                        room -= len(lines[end])
                        end += 1
                    chunk = b"".join(lines[done:end])
                    _write_all(file, chunk)
                    self._size += len(chunk)
                    done = end
        except Exception as exc:
            self._abandon()
            raise SinkError(len(batch) - done, exc) from exc

    def _abandon(self) -> None:
        """Drop the handle after a failure (its buffer may be unwritable); reopen next batch."""
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(Exception):
                file.close()

    def close(self) -> None:
        lock, self._lock = self._lock, None
        try:
            self._close_file()
        finally:
            if lock is not None:
                lock.close()

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.flush()
                os.fsync(file.fileno())
            finally:
                file.close()


_SQL_TYPES = {bool: "INTEGER", int: "INTEGER", float: "REAL", str: "TEXT"}


def _column_type(annotation: Any) -> str:
    base = next(t for t in getattr(annotation, "__args__", (annotation,)) if t is not type(None))
    return _SQL_TYPES[base]


_HINTS = get_type_hints(LogRecord)
CREATE_TABLE = "CREATE TABLE IF NOT EXISTS records ({})".format(
    ", ".join(f"{name} {_column_type(_HINTS[name])}" for name in FIELDS)
)
INSERT = "INSERT INTO records ({}) VALUES ({})".format(
    ", ".join(FIELDS), ", ".join("?" * len(FIELDS))
)


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """A log file from an earlier release gains the fields added since (as NULLs)."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(records)")}
    for name in FIELDS:
        if name not in have:
            conn.execute(f"ALTER TABLE records ADD COLUMN {name} {_column_type(_HINTS[name])}")


class SqliteSink:
    """Table `records` (a column per field, indexed on time), WAL mode, one transaction a batch."""

    name = "sqlite"

    def __init__(self, path: Path, busy_timeout_s: float = 2.0) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self._conn: sqlite3.Connection | None = None

    def open(self) -> None:
        self._open()

    def _open(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(CREATE_TABLE)
                _add_missing_columns(conn)
                conn.execute("CREATE INDEX IF NOT EXISTS records_time ON records (time)")
                conn.execute("CREATE INDEX IF NOT EXISTS records_request ON records (request_id)")
            except Exception:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def write(self, batch: Sequence[LogRecord]) -> None:
        try:
            conn = self._open()
            rows = [record_row(record) for record in batch]
            conn.execute("BEGIN")
            try:
                conn.executemany(INSERT, rows)
                conn.execute("COMMIT")
            except Exception:
                with contextlib.suppress(Exception):
                    conn.execute("ROLLBACK")
                raise
        except Exception as exc:
            self.close()
            raise SinkError(len(batch), exc) from exc

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def build_sinks(settings: LogSettings) -> list[Sink]:
    sinks: list[Sink] = []
    if settings.jsonl is not None:
        sinks.append(JsonlSink(settings.jsonl, settings.rotate_bytes, settings.rotate_keep))
    if settings.sqlite is not None:
        sinks.append(SqliteSink(settings.sqlite))
    return sinks


class AuditLog:
    """Queues records from request handlers and writes them in batches from one writer task.

    Use from the event loop thread only: `await start()` in the app's lifespan startup,
    `submit()` per request, `await close()` at shutdown.
    """

    def __init__(
        self,
        settings: LogSettings,
        metrics: Metrics,
        sinks: Sequence[Sink] | None = None,
        close_timeout_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.sinks: list[Sink] = list(sinks) if sinks is not None else build_sinks(settings)
        self.close_timeout_s = close_timeout_s
        self._queue: asyncio.Queue[LogRecord] = asyncio.Queue(settings.queue_size)
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._failing: dict[str, int] = {}  # sink name -> records lost in the current streak
        self._writing = 0  # size of the batch in the sink thread right now
        self._dropped_since_warning = 0
        self._last_warning = float("-inf")

    async def start(self) -> None:
        """Open the sinks and start the writer task. A sink that cannot open is logged, not
        fatal: its records count as dropped and it is retried with every batch."""
        if self._task is not None or self._closed:
            return
        # One thread for all sink I/O: the sinks are not thread-safe and never block the loop.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ptst-audit")
        loop = asyncio.get_running_loop()
        for sink in self.sinks:
            try:
                await loop.run_in_executor(self._executor, sink.open)
            except Exception as exc:
                self._failing[sink.name] = 0
                logger.error(
                    "refusal log: sink %s cannot open (%s: %s); its records are counted in "
                    "ptst_log_records_dropped_total until it can",
                    sink.name,
                    type(exc).__name__,
                    exc,
                )
        self._task = asyncio.create_task(self._writer(), name="ptst-audit-writer")

    def submit(self, record: LogRecord) -> None:
        """Queue a record; never blocks, never raises. Lost records are counted, not hidden."""
        try:
            if self._closed:
                self._drop("closed")
                return
            if not self.settings.log_text and (record.prompt_text or record.completion_text):
                record = dataclasses.replace(record, prompt_text=None, completion_text=None)
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self._drop("queue_full")
        except Exception:  # a request must never fail because of its log record
            logger.exception("refusal log: cannot queue a record")
            with contextlib.suppress(Exception):
                self.metrics.on_log_dropped(reason="internal")

    def _drop(self, reason: str) -> None:
        self.metrics.on_log_dropped(reason=reason)
        self._dropped_since_warning += 1
        now = time.monotonic()
        if now - self._last_warning >= DROP_WARNING_INTERVAL_S:
            logger.warning(
                "refusal log: dropped %d record(s) since the last warning (latest reason: %s); "
                "see ptst_log_records_dropped_total",
                self._dropped_since_warning,
                reason,
            )
            self._dropped_since_warning = 0
            self._last_warning = now

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            if not self._closed:
                await asyncio.sleep(BATCH_WINDOW_S)
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._writing = len(batch)
            try:
                results = await loop.run_in_executor(self._executor, self._write_batch, batch)
                self._writing = 0
                self._account(results, len(batch))
            except Exception:  # a bug here must not kill the writer or hide the loss
                self._writing = 0
                logger.exception("refusal log: batch of %d record(s) failed", len(batch))
                self.metrics.on_log_dropped(reason="internal", n=len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _write_batch(self, batch: list[LogRecord]) -> dict[str, SinkError | None]:
        """Runs in the sink thread: every sink gets the batch whatever the others do."""
        results: dict[str, SinkError | None] = {}
        for sink in self.sinks:
            try:
                sink.write(batch)
                results[sink.name] = None
            except SinkError as exc:
                results[sink.name] = exc
            except Exception as exc:
                results[sink.name] = SinkError(len(batch), exc)
        return results

    def _account(self, results: dict[str, SinkError | None], size: int) -> None:
        for name, error in results.items():
            if error is None:
                self.metrics.on_log_written(sink=name, n=size)
                lost = self._failing.pop(name, None)
                if lost is not None:
                    logger.warning(
                        "refusal log: sink %s recovered after losing %d record(s)", name, lost
                    )
                continue
            self.metrics.on_log_written(sink=name, n=size - error.lost)
            self.metrics.on_log_dropped(reason="sink_error", n=error.lost, sink=name)
            if name not in self._failing:
                logger.error(
                    "refusal log: sink %s failing (%s: %s); its records are counted in "
                    "ptst_log_records_dropped_total until it recovers",
                    name,
                    type(error.cause).__name__,
                    error.cause,
                )
            self._failing[name] = self._failing.get(name, 0) + error.lost

    async def close(self) -> None:
        """Write what is queued (within `close_timeout_s`), then close the sinks.

        Records still queued when time runs out are counted as dropped (reason "shutdown").
        """
        if self._closed:
            return
        if self._task is None and not self._queue.empty():
            await self.start()  # records submitted before start() are still written
        self._closed = True
        try:
            if self._task is not None:
                await asyncio.wait_for(self._queue.join(), self.close_timeout_s)
        except TimeoutError:
            lost = 0
            while not self._queue.empty():
                self._queue.get_nowait()
                self._queue.task_done()
                lost += 1
            logger.error("refusal log: shutdown timed out; %d queued record(s) not written", lost)
            self.metrics.on_log_dropped(reason="shutdown", n=lost)
        finally:
            await self._stop_writer()

    async def _stop_writer(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._writing:
            # Cancelled while a batch was still in the sink thread: it may or may not land.
            logger.error("refusal log: shutdown interrupted a batch of %d record(s)", self._writing)
            self.metrics.on_log_dropped(reason="shutdown", n=self._writing)
            self._writing = 0
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        try:
            # Queued behind any batch still being written, so that batch finishes first.
            await asyncio.wait_for(
                loop.run_in_executor(executor, self._close_sinks), self.close_timeout_s
            )
        except TimeoutError:
            logger.error("refusal log: sinks did not close in %.0f s", self.close_timeout_s)
        finally:
            executor.shutdown(wait=False)

    def _close_sinks(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                logger.exception("refusal log: closing sink %s failed", sink.name)


def _write_all(file: IO[bytes], data: bytes) -> None:
    """One write() for the whole chunk when the OS takes it (it does for regular files)."""
    view = memoryview(data)
    while view:
        n = file.write(view)
        if not n:
            raise OSError(f"short write to {file.name}")
        view = view[n:]


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


# ---- reading the SQLite log (used by `ptst logs`) ----------------------------------------

GROUP_COLUMNS = {"route": "route", "template": "template", "model": "upstream_model"}


def connect_readonly(db: Path) -> sqlite3.Connection:
    """Open an existing log database for reading; FileNotFoundError if there is none."""
    if not db.is_file():
        raise FileNotFoundError(f"no refusal log database at {db}")
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    return conn


def query_stats(
    db: Path, since_s: float | None, by: str, now: float | None = None
) -> list[dict[str, Any]]:
    """Refusal counts per group (`by`: route, template or model) over the last `since_s` seconds.

    Each row: group, requests, judged (records with a refusal verdict), refusals,
    refusal_rate (refusals / judged, None if nothing was judged), errors (status >= 400).
    """
    column = GROUP_COLUMNS.get(by)
    if column is None:
        raise ValueError(f"cannot group by {by!r}; choose one of {', '.join(GROUP_COLUMNS)}")
    where, params = "", []
    if since_s is not None:
        where = "WHERE time >= ?"
        params.append((time.time() if now is None else now) - since_s)
    sql = f"""
        SELECT {column} AS grp, COUNT(*) AS requests, COUNT(refusal) AS judged,
               COALESCE(SUM(refusal), 0) AS refusals,
               SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS errors
        FROM records {where} GROUP BY {column} ORDER BY requests DESC, grp
    """
    with contextlib.closing(connect_readonly(db)) as conn:
        rows = conn.execute(sql, params).fetchall()
    return [
        {
            "group": row["grp"],
            "requests": row["requests"],
            "judged": row["judged"],
            "refusals": row["refusals"],
            "refusal_rate": row["refusals"] / row["judged"] if row["judged"] else None,
            "errors": row["errors"],
        }
        for row in rows
    ]


def by_request_id(db: Path, request_id: str) -> list[dict[str, Any]]:
    """The records of one request (one, unless the client reused a request id)."""
    columns = ", ".join(FIELDS)
    with contextlib.closing(connect_readonly(db)) as conn:
        sql = f"SELECT {columns} FROM records WHERE request_id = ? ORDER BY rowid"
        return [_row_to_record(row) for row in conn.execute(sql, (request_id,)).fetchall()]


def tail(db: Path, n: int = 20, after_id: int | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(row id, record dict) pairs, oldest first: the last `n`, or up to `n` after `after_id`."""
    columns = ", ".join(FIELDS)
    with contextlib.closing(connect_readonly(db)) as conn:
        if after_id is None:
            sql = f"SELECT rowid, {columns} FROM records ORDER BY rowid DESC LIMIT ?"
            rows = list(reversed(conn.execute(sql, (n,)).fetchall()))
        else:
            sql = f"SELECT rowid, {columns} FROM records WHERE rowid > ? ORDER BY rowid LIMIT ?"
            rows = conn.execute(sql, (after_id, n)).fetchall()
    return [(row["rowid"], _row_to_record(row)) for row in rows]


def _row_to_record(row: sqlite3.Row) -> dict[str, Any]:
    record = {name: row[name] for name in FIELDS}
    for name in ("stream", "refusal"):
        if record[name] is not None:
            record[name] = bool(record[name])
    return record
