"""The app factory: every router mounted, the UI router only when its module exists."""

from __future__ import annotations

import importlib.util

import pytest
from fastapi.testclient import TestClient

from api import main


def _paths(app: object) -> set[str]:
    return {p for r in app.state.routers for p in (getattr(x, "path", "") for x in r.routes)}  # type: ignore[attr-defined]


def test_routers_and_optional_ui(monkeypatch: pytest.MonkeyPatch, pg_env: str) -> None:
    app = main.create_app()
    assert {"/v1/models", "/v1/jobs/{job_id}/events/stream", "/v1/artifacts/{artifact_id}/content",
            "/v1/passes", "/healthz", "/readyz", "/metrics"} <= _paths(app)
    has_ui = importlib.util.find_spec(main.UI_MODULE) is not None
    assert ("/" in _paths(app)) == has_ui
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == main.UI_MODULE else real(name, *a))
    bare = main.create_app()
    assert "/" not in _paths(bare)
    with TestClient(bare) as client:
        r = client.get("/")
        assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_readyz_on_the_embedded_defaults(sqlite_env: str) -> None:
    with TestClient(main.create_app()) as client:
        r = client.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
