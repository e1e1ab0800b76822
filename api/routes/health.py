"""Liveness, readiness (no authentication: probes call these) and Prometheus metrics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import bearer_key, owner_for_key, settings_dep, unauthorized
from api.errors import problem_response
from api.services.health import readiness
from models.settings import Settings

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(request: Request) -> Any:
    """Database, broker and storage reachable: 200, else 503 problem naming what is down."""
    checks = await readiness()
    down = {name: why for name, why in checks.items() if why != "ok"}
    if not down:
        return {"status": "ok", "checks": checks}
    detail = "not ready: " + "; ".join(f"{name} ({why})" for name, why in down.items())
    return problem_response(
        request, 503, "not_ready", detail, errors=[{"field": name, "message": why} for name, why in down.items()]
    )


@router.get("/metrics")
def metrics(request: Request, settings: Annotated[Settings, Depends(settings_dep)]) -> Response:
    """Prometheus text exposition; when the docs are not public it needs the Bearer key (a scraper can send it)."""
    if not settings.docs_are_public and owner_for_key(settings, bearer_key(request)) is None:
        raise unauthorized()
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
