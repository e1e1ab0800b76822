"""The FastAPI application: routers, problem+json errors, metrics. ``uvicorn api.main:app``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request

from api import errors, openapi
from api.bodylimit import JsonBodyLimit
from api.routes import artifacts, datasets, health, jobs, keys, models, passes, ui
from api.services.metrics import Metrics, MetricsMiddleware
from models.settings import get_settings

log = logging.getLogger("modelpress.api")


@asynccontextmanager
async def _lifespan(_app: FastAPI) -> AsyncIterator[None]:
    """At start: remove staged uploads that a killed API process left behind (storage/staging.py): this
    host's at once (their lock says no process holds them), other hosts' after LEFTOVER_GRACE_S."""
    from storage import get_store
    from storage.staging import sweep_leftovers

    try:
        swept = await anyio.to_thread.run_sync(
            sweep_leftovers, get_store().staging_dir, get_settings().leftover_grace_s, 0.0)
        if swept.files:
            log.warning("removed %d staged uploads (%d bytes) left by a killed process", swept.files, swept.bytes)
    except Exception:  # a storage problem shows in /readyz; it must not keep the API from starting
        log.warning("start-up sweep of staged uploads failed", exc_info=True)
    yield


def create_app() -> FastAPI:
    """A new API application (tests make one per test; ``app`` below is the process's)."""
    public = get_settings().docs_are_public
    app = FastAPI(
        docs_url="/docs" if public else None,
        redoc_url="/redoc" if public else None,
        openapi_url="/openapi.json" if public else None,
        title="modelpress",
        version="0.1.0",
        description="Upload a model and data, submit an optimization job, download the ONNX and its report.",
        lifespan=_lifespan,
    )
    errors.install(app)
    metrics = Metrics()
    app.state.metrics = metrics
    app.add_middleware(JsonBodyLimit)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.routers = []
    for module in (health, models, datasets, jobs, artifacts, passes, keys, ui):
        app.include_router(module.router)
        app.state.routers.append(module.router)
    openapi.install(app)
    if not public:
        _closed_document(app)
    return app


def _closed_document(app: FastAPI) -> None:
    """With closed docs, ``/openapi.json`` still answers a caller with a valid key (any scope); 404 otherwise."""
    from fastapi.responses import JSONResponse

    from api.deps import resolve_principal
    from api.errors import ProblemError

    @app.get("/openapi.json", include_in_schema=False)
    async def document(request: Request) -> JSONResponse:
        if await resolve_principal(request, get_settings()) is None:
            raise ProblemError(404, "not_found", "the API document is served to callers with an API key")
        return JSONResponse(app.openapi())


app = create_app()
