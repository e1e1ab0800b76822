"""The FastAPI application: routers, problem+json errors, metrics. ``uvicorn api.main:app``."""

from __future__ import annotations

import importlib
import importlib.util
import logging

from fastapi import FastAPI

from api import errors
from api.routes import artifacts, datasets, health, jobs, models, passes
from api.services.metrics import Metrics, MetricsMiddleware

log = logging.getLogger("modelpress.api")

UI_MODULE = "api.routes.ui"


def _include_ui(app: FastAPI) -> None:
    """Mount the dashboard/report router when that module exists (it is built separately)."""
    if importlib.util.find_spec(UI_MODULE) is None:
        return
    module = importlib.import_module(UI_MODULE)
    router = getattr(module, "router", None)
    if router is not None:
        app.include_router(router)
        app.state.routers.append(router)


def create_app() -> FastAPI:
    """A new API application (tests make one per test; ``app`` below is the process's)."""
    app = FastAPI(
        title="modelpress",
        version="0.1.0",
        description="Upload a model and data, submit an optimization job, download the ONNX and its report.",
    )
    errors.install(app)
    metrics = Metrics()
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.routers = []
    for module in (health, models, datasets, jobs, artifacts, passes):
        app.include_router(module.router)
        app.state.routers.append(module.router)
    _include_ui(app)
    return app


app = create_app()
