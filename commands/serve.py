"""`ptst serve --config FILE`: run the proxy with uvicorn. One worker runs in this process;
several share a run folder this process makes (proxy/workers.py: summed metrics, reloads that
reach every worker) under commands/supervisor.py."""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import sys
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from ptst.commands import supervisor
from ptst.engine.demo_model import DemoModelError, ensure_model
from ptst.proxy import workers
from ptst.proxy.app import create_app
from ptst.proxy.config import ConfigError, load_settings
from ptst.proxy.drain import BACKSTOP_S
from ptst.proxy.state import SnapshotError

CONFIG_ENV = "PTST_CONFIG"
APP = "ptst.commands.serve:app_from_env"


def app_from_env() -> FastAPI:
    """uvicorn factory: the config path comes from PTST_CONFIG (so workers can import it)."""
    path = Path(os.environ[CONFIG_ENV])
    return create_app(load_settings(path), config_path=path)


LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get(CONFIG_ENV),
        required=CONFIG_ENV not in os.environ,
        help=f"proxy YAML config (default: ${CONFIG_ENV})",
    )
    parser.add_argument(
        "--host", default=None, help="override server.host (default: 127.0.0.1, loopback only)"
    )
    parser.add_argument("--port", type=int, default=None, help="override server.port")
    parser.add_argument(
        "--workers", type=int, default=1, help="server processes on one port (default: 1)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=LOG_LEVELS, help="the proxy's and uvicorn's level"
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="text lines, or one JSON object per line (for log collectors)",
    )


def log_config(level: str, fmt: str) -> dict[str, Any]:
    """One logging config for the proxy's loggers and uvicorn's, applied in every worker."""
    formatter: dict[str, Any] = (
        {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(name)s %(levelname)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        }
        if fmt == "json"
        else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            name: {"handlers": [], "level": level.upper(), "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


def run(args: argparse.Namespace) -> int:
    logging_config = log_config(args.log_level, args.log_format)
    logging.config.dictConfig(logging_config)
    try:
        settings = load_settings(args.config)
        create_app(settings)  # validates templates and routes now, with a readable error
    except (ConfigError, SnapshotError) as exc:
        print(f"ptst serve: {exc}", file=sys.stderr)
        return 2
    if settings.log.second_stage:
        from ptst.proxy.second_stage import PROBE_MODEL

        try:  # the second stage's probe model, built once, before the workers load it
            ensure_model(PROBE_MODEL)
        except DemoModelError as exc:
            print(f"ptst serve: log.second_stage: {exc}", file=sys.stderr)
            return 2
    os.environ[CONFIG_ENV] = str(args.config.resolve())
    options: dict[str, Any] = {
        "factory": True,
        "host": args.host or settings.server.host,
        "port": args.port if args.port is not None else settings.server.port,
        "loop": "uvloop",
        "http": "httptools",
        "access_log": False,
        "proxy_headers": False,  # the proxy does not use client addresses
        "log_level": args.log_level,
        "log_config": logging_config,
        # the app ends what still runs at shutdown_timeout_s (proxy/drain.py); uvicorn's own
        # timeout is the backstop
        "timeout_graceful_shutdown": settings.server.shutdown_timeout_s + BACKSTOP_S,
    }
    if args.workers <= 1:
        os.environ.pop(workers.RUN_DIR_ENV, None)  # alone: no run folder, whatever we inherited
        uvicorn.run(APP, **options)
        return 0
    with workers.run_folder() as run_dir:  # before the workers start: they inherit it
        supervisor.serve(uvicorn.Config(APP, workers=args.workers, **options), run_dir)
    return 0
