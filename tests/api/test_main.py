"""The app factory: every router mounted, the pages included."""

from __future__ import annotations

from fastapi.testclient import TestClient

from api import main


def _paths(app: object) -> set[str]:
    return {p for r in app.state.routers for p in (getattr(x, "path", "") for x in r.routes)}  # type: ignore[attr-defined]


def test_every_router_is_mounted(pg_env: str) -> None:
    app = main.create_app()
    assert {"/v1/models", "/v1/jobs/{job_id}/events/stream", "/v1/artifacts/{artifact_id}/content",
            "/v1/passes", "/healthz", "/readyz", "/metrics", "/", "/v1/jobs/{job_id}/report.html",
            "/login", "/logout"} <= _paths(app)
    with TestClient(app) as client:
        r = client.get("/nowhere")
        assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_readyz_on_the_embedded_defaults(sqlite_env: str) -> None:
    with TestClient(main.create_app()) as client:
        r = client.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
