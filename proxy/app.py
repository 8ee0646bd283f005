"""`create_app(settings)`: the FastAPI app. Its lifespan owns the upstream pool, the metrics
registry, the audit log writer, the template watcher and the shutdown deadline; nothing lives
in module globals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from ptst.proxy import openapi, workers
from ptst.proxy.audit import AuditLog
from ptst.proxy.config import Settings
from ptst.proxy.drain import Drain, DrainMiddleware
from ptst.proxy.errors import ProxyError, error_body
from ptst.proxy.metrics import Metrics
from ptst.proxy.reload import Reloader
from ptst.proxy.routes import authorized, router
from ptst.proxy.second_stage import WEIGHTS, Rescorer, SecondStage
from ptst.proxy.state import ProxyState, build_snapshot
from ptst.proxy.upstream import Upstreams

log = logging.getLogger("ptst")


def create_app(settings: Settings, config_path: Path | None = None) -> FastAPI:
    """Build the proxy. With `config_path`, edits to that file are picked up live."""
    snapshot = build_snapshot(settings)  # fail at start on unknown templates, bad files
    server = snapshot.settings.server  # read at start only, as uvicorn's own settings are
    drain = Drain(server.shutdown_timeout_s)
    run_dir = workers.current()  # one of several workers of a `ptst serve`, or None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics(multiprocess_dir=workers.metrics_dir(run_dir) if run_dir else None)
        audit = AuditLog(snapshot.settings.log, metrics)
        upstreams = Upstreams(snapshot.settings.server, metrics.on_upstream_error)
        rescorer = await start_second_stage(snapshot.settings)
        state = ProxyState(snapshot, upstreams, metrics, audit, rescorer, drain)
        reloader = Reloader(state, config_path, run_dir)
        app.state.proxy, app.state.reloader = state, reloader
        if not snapshot.settings.api_keys:
            log.warning("no api_keys configured: the proxy is open to anyone who can reach it")
        await audit.start()
        watcher = asyncio.create_task(reloader.watch())
        try:
            with drain.on_signals():
                yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await upstreams.aclose()
            if rescorer is not None:
                await rescorer.close()  # its records reach the log before the log closes
            await audit.close()

    app = FastAPI(title="ptst-proxy", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.include_router(router)
    openapi.install(app)  # the generation routes are plain Starlette routes: add them
    app.add_middleware(DrainMiddleware, drain=drain)
    if server.cors_allow_origins:  # no CORS headers at all unless origins are configured
        app.add_middleware(
            CORSMiddleware,
            allow_origins=server.cors_allow_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],  # the OpenAI SDKs send several x-stainless-* headers
            expose_headers=["x-request-id", "x-ptst-refusal", "retry-after"],
        )

    @app.post("/admin/reload")
    async def admin_reload(request: Request) -> JSONResponse:
        state = authorized(request)
        error = await request.app.state.reloader.reload(everywhere=True)
        if error:
            return JSONResponse(error_body(error, "reload_error"), status_code=400)
        snap = state.snapshot
        return JSONResponse(
            {
                "status": "reloaded",
                "routes": [r.model for r in snap.settings.routes],
                "templates": sorted(snap.templates),
            }
        )

    @app.exception_handler(ProxyError)
    async def proxy_error(request: Request, exc: ProxyError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "invalid_request_error"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        if hasattr(request.app.state, "proxy"):
            request.app.state.proxy.metrics.on_rejected("other", exc.status_code, kind)
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal proxy error", "internal_error"), status_code=500)

    return app


async def start_second_stage(settings: Settings) -> Rescorer | None:
    """The second-stage rescorer when `log.second_stage` is on (loading the two models
    takes seconds, so it happens at start, on a thread)."""
    if not settings.log.second_stage:
        return None
    weights = settings.log.second_stage_weights or WEIGHTS
    stage = await asyncio.to_thread(SecondStage.load, weights)
    log.info("refusal detector: second stage on (%s)", weights)
    return Rescorer(stage)
