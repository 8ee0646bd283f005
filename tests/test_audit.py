"""The refusal log: both sinks, rotation, overflow, failing sinks, graceful close."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from ptst.proxy.audit import AuditLog, JsonlSink, Sink, SqliteSink, query_stats, tail
from ptst.proxy.config import LogSettings
from ptst.proxy.metrics import Metrics
from ptst.proxy.record import LogRecord

if TYPE_CHECKING:
    from tests.conftest import Proxy


def record(i: int, **changes: Any) -> LogRecord:
    base = LogRecord(
        request_id=f"req-{i}",
        time=1_700_000_000.0 + i,
        route="demo",
        upstream_model="smollm2",
        template="chat:llama",
        mode="messages",
        stream=i % 2 == 0,
        status=200,
        refusal=i % 3 == 0,
        rule="keyword:I cannot" if i % 3 == 0 else None,
        score=None,
        latency_s=0.5 + i / 100,
        ttft_s=0.1,
        prompt_tokens=10 + i,
        completion_tokens=20,
        prompt_sha256="ab" * 32,
        prompt_text=f"prompt {i} ünïcode",
        completion_text=f"answer {i}",
    )
    return dataclasses.replace(base, **changes)


def settings(tmp_path: Path, **changes: Any) -> LogSettings:
    values: dict[str, Any] = {
        "jsonl": tmp_path / "logs" / "refusals.jsonl",
        "sqlite": tmp_path / "logs" / "refusals.sqlite3",
        "log_text": True,
    }
    values.update(changes)
    return LogSettings(**values)


def dropped(metrics: Metrics, reason: str, sink: str = "all") -> float:
    value = metrics.registry.get_sample_value(
        "ptst_log_records_dropped_total", {"reason": reason, "sink": sink}
    )
    return value or 0.0


def written(metrics: Metrics, sink: str) -> float:
    value = metrics.registry.get_sample_value("ptst_log_records_written_total", {"sink": sink})
    return value or 0.0


def jsonl_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_log(log: AuditLog, records: Sequence[LogRecord], start: bool = True) -> None:
    async def main() -> None:
        if start:
            await log.start()
        for rec in records:
            log.submit(rec)
        await log.close()

    asyncio.run(main())


def test_records_round_trip_into_both_sinks(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    metrics = Metrics()
    records = [record(i) for i in range(5)] + [
        record(5, template=None, refusal=None, status=502, error="upstream timeout")
    ]
    run_log(AuditLog(cfg, metrics), records)

    expected = [r.to_dict() for r in records]
    assert cfg.jsonl is not None and cfg.sqlite is not None
    assert jsonl_records(cfg.jsonl) == expected
    assert [rec for _, rec in tail(cfg.sqlite, 100)] == expected
    assert written(metrics, "jsonl") == written(metrics, "sqlite") == len(records)
    mode = sqlite3.connect(cfg.sqlite).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_log_text_off_blanks_texts(tmp_path: Path) -> None:
    cfg = settings(tmp_path, log_text=False)
    run_log(AuditLog(cfg, Metrics()), [record(1), record(2)])
    assert cfg.jsonl is not None and cfg.sqlite is not None
    for rec in [*jsonl_records(cfg.jsonl), *(r for _, r in tail(cfg.sqlite))]:
        assert rec["prompt_text"] is None and rec["completion_text"] is None
        assert rec["prompt_sha256"] == "ab" * 32


def test_jsonl_rotation_keeps_n_files_in_order(tmp_path: Path) -> None:
    same = {"stream": True, "refusal": False, "rule": None, "latency_s": 0.5, "prompt_tokens": 9}
    records = [record(i, **same) for i in range(10, 30)]  # 20 lines of one size
    line_size = len(json.dumps(records[0].to_dict(), ensure_ascii=False).encode()) + 1
    cfg = settings(tmp_path, sqlite=None, rotate_bytes=3 * line_size + 5, rotate_keep=2)
    run_log(AuditLog(cfg, Metrics()), records)

    assert cfg.jsonl is not None
    base = cfg.jsonl
    files = [base.with_name(base.name + ".2"), base.with_name(base.name + ".1"), base]
    assert all(f.exists() for f in files)
    assert not base.with_name(base.name + ".3").exists()
    assert all(f.stat().st_size <= cfg.rotate_bytes for f in files)
    assert [len(jsonl_records(f)) for f in files] == [3, 3, 2]  # 20 = 6 * 3 + 2
    ids = [rec["request_id"] for f in files for rec in jsonl_records(f)]
    assert ids == [f"req-{i}" for i in range(22, 30)]  # the newest, in order


WRITER = """
import sys
from pathlib import Path
from tests.test_audit import record
from ptst.proxy.audit import JsonlSink

path, rotate, start = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sink = JsonlSink(path, rotate, 1000)
for i in range(start, start + 400, 8):
    sink.write([record(j) for j in range(i, i + 8)])
sink.close()
"""


def test_jsonl_workers_share_one_file(tmp_path: Path) -> None:
    """Two processes appending to one JSONL file with rotation (`ptst serve --workers 2`): no
    line torn or interleaved, none lost, every file within the size limit."""
    path, rotate = tmp_path / "r.jsonl", 4000
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(rotate), str(start)],
            cwd=Path(__file__).resolve().parent.parent,
        )
        for start in (0, 10_000)
    ]
    assert [w.wait(timeout=60) for w in writers] == [0, 0]
    files = sorted(tmp_path.glob("r.jsonl*"))
    logs = [f for f in files if not f.name.endswith(".lock")]
    assert len(logs) > 10  # it rotated many times
    assert all(f.stat().st_size <= rotate for f in logs)
    ids = sorted(int(rec["request_id"][4:]) for f in logs for rec in jsonl_records(f))
    assert ids == [*range(0, 400), *range(10_000, 10_400)]


def test_overflow_drops_and_counts(tmp_path: Path) -> None:
    cfg = settings(tmp_path, queue_size=3)
    metrics = Metrics()
    run_log(AuditLog(cfg, metrics), [record(i) for i in range(8)], start=False)
    assert dropped(metrics, "queue_full") == 5
    assert cfg.sqlite is not None
    assert [r["request_id"] for _, r in tail(cfg.sqlite)] == ["req-0", "req-1", "req-2"]


def test_unwritable_jsonl_path_does_not_stop_sqlite(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = settings(tmp_path, jsonl=blocker / "refusals.jsonl")
    metrics = Metrics()
    log = AuditLog(cfg, metrics)

    async def main() -> None:
        await log.start()
        for batch in range(3):  # three batches: one error log line for the whole streak
            for i in range(4):
                log.submit(record(10 * batch + i))
            await asyncio.sleep(0.05)
        await log.close()

    with caplog.at_level(logging.ERROR, logger="ptst.proxy.audit"):
        asyncio.run(main())
    assert cfg.sqlite is not None
    assert len(tail(cfg.sqlite, 100)) == 12
    assert dropped(metrics, "sink_error", "jsonl") == 12
    assert written(metrics, "sqlite") == 12
    assert sum("sink jsonl" in r.getMessage() for r in caplog.records) == 1


class FlakySink:
    """Fails its first `failures` batches, then records what it gets and from which thread."""

    name = "flaky"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.records: list[LogRecord] = []
        self.threads: set[str] = set()

    def open(self) -> None:
        pass

    def write(self, batch: Sequence[LogRecord]) -> None:
        self.threads.add(threading.current_thread().name)
        if self.failures:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        self.records.extend(batch)

    def close(self) -> None:
        pass


def test_failing_sink_counts_drops_recovers_and_runs_off_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = settings(tmp_path)
    assert cfg.sqlite is not None
    flaky = FlakySink(failures=1)
    metrics = Metrics()
    log = AuditLog(cfg, metrics, sinks=[flaky, SqliteSink(cfg.sqlite)])

    async def main() -> None:
        await log.start()
        for i in range(3):
            log.submit(record(i))
        await asyncio.sleep(0.1)
        for i in range(3, 5):
            log.submit(record(i))
        await log.close()

    with caplog.at_level(logging.WARNING, logger="ptst.proxy.audit"):
        asyncio.run(main())
    assert [r.request_id for r in flaky.records] == ["req-3", "req-4"]
    assert dropped(metrics, "sink_error", "flaky") == 3
    assert len(tail(cfg.sqlite)) == 5
    assert any("recovered after losing 3" in r.getMessage() for r in caplog.records)
    assert flaky.threads and threading.main_thread().name not in flaky.threads


def test_locked_sqlite_falls_back_to_jsonl_and_recovers(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    assert cfg.jsonl is not None and cfg.sqlite is not None
    cfg.sqlite.parent.mkdir(parents=True)
    SqliteSink(cfg.sqlite).write([record(0)])  # create the table
    metrics = Metrics()
    sinks: list[Sink] = [
        JsonlSink(cfg.jsonl, 10**6, 2),
        SqliteSink(cfg.sqlite, busy_timeout_s=0.05),
    ]
    log = AuditLog(cfg, metrics, sinks=sinks)
    locker = sqlite3.connect(cfg.sqlite, isolation_level=None, check_same_thread=False)

    async def main() -> None:
        await log.start()
        locker.execute("BEGIN EXCLUSIVE")
        log.submit(record(1))
        await asyncio.sleep(0.5)
        locker.execute("COMMIT")
        log.submit(record(2))
        await log.close()

    asyncio.run(main())
    locker.close()
    assert [r["request_id"] for r in jsonl_records(cfg.jsonl)] == ["req-1", "req-2"]
    assert [r["request_id"] for _, r in tail(cfg.sqlite)] == ["req-0", "req-2"]
    assert dropped(metrics, "sink_error", "sqlite") == 1


def test_close_flushes_everything_submitted(tmp_path: Path) -> None:
    cfg = settings(tmp_path, queue_size=5000)
    metrics = Metrics()
    run_log(AuditLog(cfg, metrics), [record(i) for i in range(2000)])
    assert cfg.jsonl is not None and cfg.sqlite is not None
    assert len(jsonl_records(cfg.jsonl)) == 2000
    assert query_stats(cfg.sqlite, None, "route")[0]["requests"] == 2000
    assert dropped(metrics, "queue_full") == 0


class BlockingSink:
    name = "blocking"

    def __init__(self) -> None:
        self.release = threading.Event()

    def open(self) -> None:
        pass

    def write(self, batch: Sequence[LogRecord]) -> None:
        self.release.wait(5)

    def close(self) -> None:
        pass


def test_close_is_bounded_and_counts_what_it_could_not_write(tmp_path: Path) -> None:
    sink = BlockingSink()
    metrics = Metrics()
    log = AuditLog(settings(tmp_path), metrics, sinks=[sink], close_timeout_s=0.2)

    async def main() -> float:
        await log.start()
        log.submit(record(0))
        await asyncio.sleep(0.05)  # record 0 is now in the sink thread
        for i in range(1, 4):
            log.submit(record(i))
        loop = asyncio.get_running_loop()
        began = loop.time()
        await log.close()
        elapsed = loop.time() - began
        sink.release.set()
        return elapsed

    elapsed = asyncio.run(main())
    assert elapsed < 2.0
    assert dropped(metrics, "shutdown") == 4


def test_submit_after_close_is_counted(tmp_path: Path) -> None:
    metrics = Metrics()
    log = AuditLog(settings(tmp_path), metrics)

    async def main() -> None:
        await log.start()
        await log.close()
        log.submit(record(1))

    asyncio.run(main())
    assert dropped(metrics, "closed") == 1


def test_jsonl_sink_reports_partial_loss_and_repairs_a_cut_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"cut": tr')  # a line cut short by a crash
    sink = JsonlSink(path, 10**6, 2)
    sink.write([record(1)])
    sink.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == '{"cut": tr'
    assert json.loads(lines[1])["request_id"] == "req-1"


def test_jsonl_sink_follows_a_file_moved_away(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    sink = JsonlSink(path, 10**6, 2)
    sink.write([record(1)])
    path.rename(tmp_path / "r.jsonl.old")  # e.g. logrotate, or another worker rotating
    sink.write([record(2)])
    sink.close()
    assert [r["request_id"] for r in jsonl_records(path)] == ["req-2"]
    assert [r["request_id"] for r in jsonl_records(tmp_path / "r.jsonl.old")] == ["req-1"]


# ---- end to end: a real `ptst serve` process, SIGTERM under load ---------------------------


def test_sigterm_during_load_loses_no_record_of_a_delivered_response(
    start_proxy: Callable[..., Proxy], responder_url: str
) -> None:
    routes = [
        {"model": "slow", "upstream": responder_url, "upstream_model": "slow"},
        {"model": "fast", "upstream": responder_url, "upstream_model": "tok"},
    ]
    proxy = start_proxy(routes, log={"queue_size": 100_000})
    delivered: list[str] = []  # request ids of answers the client got in full
    spanning = 0  # answers that started before the SIGTERM and were delivered after it
    streaming = 0  # slow streams whose answer has started and not ended
    ready = asyncio.Event()  # set when both are true: 16 delivered, one streaming
    sigterm_at: float | None = None

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal spanning, streaming
        stream = i % 2 == 0
        body = {
            "model": "slow" if stream else "fast",
            "messages": [{"role": "user", "content": f"question {i}"}],
            "stream": stream,
        }
        began = time.monotonic()
        async with client.stream("POST", "/chat/completions", json=body) as resp:
            streaming += stream
            if len(delivered) >= 16 and streaming:
                ready.set()
            try:
                text = (await resp.aread()).decode()
            finally:
                streaming -= stream
        complete = "data: [DONE]" in text if stream else '"choices"' in text
        if resp.status_code == 200 and complete:
            delivered.append(resp.headers["x-request-id"])
            if sigterm_at is not None and began < sigterm_at:
                spanning += 1

    async def worker(client: httpx.AsyncClient, w: int) -> None:
        for i in itertools.count(w, 16):
            if proxy.server.proc.poll() is not None:
                return
            try:
                await one(client, i)
            except httpx.HTTPError:
                await asyncio.sleep(0.02)  # refused or cut once shutdown starts

    async def load() -> None:
        nonlocal sigterm_at
        timeout = httpx.Timeout(30.0)
        async with httpx.AsyncClient(base_url=proxy.base_url, timeout=timeout) as client:
            workers = [asyncio.create_task(worker(client, w)) for w in range(16)]
            # SIGTERM once answers have been delivered and streams are mid-answer, however
            # slow the machine is today
            await asyncio.wait_for(ready.wait(), 30)
            sigterm_at = time.monotonic()
            proxy.server.signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*workers), 40)

    asyncio.run(load())
    # uvicorn shuts down gracefully, then re-raises the signal: exit code -15 is a clean stop.
    assert proxy.server.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert any("Application shutdown complete" in line for line in proxy.server.lines)
    assert len(delivered) >= 16 and spanning > 0, (len(delivered), spanning)
    log = proxy.config["log"]
    in_sqlite = {r["request_id"] for _, r in tail(Path(log["sqlite"]), 1_000_000)}
    in_jsonl = {r["request_id"] for r in jsonl_records(Path(log["jsonl"]))}
    assert set(delivered) <= in_sqlite
    assert set(delivered) <= in_jsonl
    assert not [line for line in proxy.server.lines if "refusal log:" in line]
