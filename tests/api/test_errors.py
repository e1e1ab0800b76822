"""Every error is problem+json: unknown routes, wrong methods, bad JSON, auth, crashes (no traceback)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

PROBLEM = "application/problem+json"


def test_unknown_route_and_method(client: TestClient) -> None:
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["code"] == "not_found" and body["instance"] == "/v1/nothing-here"
    assert {"type", "title", "status", "detail", "code"} <= set(body) and body["title"] == "Not Found"
    r = client.delete("/v1/jobs")
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed" and "GET" in r.headers["allow"]


def test_bad_json_body(client: TestClient) -> None:
    r = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    assert r.json()["code"] == "validation_error" and r.json()["errors"][0]["field"] == "body"
    r = client.post("/v1/jobs", json={})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "model"


def test_api_key(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_API_KEY", "s3cret")
    get_settings.cache_clear()
    r = client.get("/v1/jobs")
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/healthz").status_code == 200  # probes need no key


def test_unexpected_error_is_a_500_problem_without_traceback(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from api.services import passes

    def boom() -> list[object]:
        raise RuntimeError("secret internal state")

    monkeypatch.setattr(passes, "list_passes", boom)
    import api.routes.passes as route

    monkeypatch.setattr(route, "list_passes", boom)
    r = client.get("/v1/passes")
    assert r.status_code == 500 and r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["code"] == "internal_error" and "reference err_" in body["detail"]
    assert "secret" not in r.text and "Traceback" not in r.text
    assert any("secret internal state" in str(rec.exc_info) for rec in caplog.records if rec.exc_info)


def test_a_problem_renders_its_title_headers_errors_and_instance() -> None:
    import json

    from api.errors import ProblemError, problem_response

    problem = ProblemError(418, "teapot", "limit: short and stout", errors=[{"field": "limit", "message": "stout"}],
                           headers={"Retry-After": "5"}, title="Teapot")
    r = problem.response(None)
    assert r.status_code == 418 and r.headers["content-type"] == PROBLEM and r.headers["retry-after"] == "5"
    assert json.loads(r.body) == {"type": "about:blank", "title": "Teapot", "status": 418, "code": "teapot",
                                  "detail": "limit: short and stout",
                                  "errors": [{"field": "limit", "message": "stout"}]}
    plain = problem_response(None, 599, "odd", "no phrase for this status")
    assert json.loads(plain.body)["title"] == "Error" and "errors" not in json.loads(plain.body)
