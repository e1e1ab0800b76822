"""Liveness, readiness (each dependency) and the Prometheus endpoint."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.api import builders


def test_healthz(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_ok_on_postgres_and_redis(client: TestClient, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_BROKER_URL", redis_url)
    get_settings.cache_clear()
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok", "storage": "ok"}}


def test_readyz_names_what_is_down(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_BROKER_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    r = client.get("/readyz")
    assert r.status_code == 503 and r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == "not_ready" and "broker" in body["detail"]
    assert [e["field"] for e in body["errors"]] == ["broker"]
    assert body["errors"][0]["message"] == "broker unreachable"
    assert "127.0.0.1" not in r.text and "redis://" not in r.text and "Error" not in r.text


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc", "/metrics"])
def test_docs_and_metrics_are_closed_when_a_key_is_configured(
    pg_env: str, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    from api.main import create_app
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_API_KEY", "sekrit")
    get_settings.cache_clear()
    with TestClient(create_app(), raise_server_exceptions=False) as c:
        r = c.get(path)
        assert r.status_code in (401, 404) and r.headers["content-type"].startswith("application/problem+json")
        if path == "/metrics":
            assert c.get(path, headers={"Authorization": "Bearer sekrit"}).status_code == 200
    monkeypatch.setenv("MODELPRESS_PUBLIC_DOCS", "true")
    get_settings.cache_clear()
    with TestClient(create_app(), raise_server_exceptions=False) as c:
        assert c.get(path).status_code == 200


def test_docs_and_metrics_are_open_without_a_key(client: TestClient) -> None:
    for path in ("/docs", "/openapi.json", "/metrics"):
        assert client.get(path).status_code == 200, path


def test_metrics(client: TestClient) -> None:
    model_id = builders.insert_model()
    builders.insert_job(model_id, "queued")
    builders.insert_job(model_id, "failed")
    job_id = builders.insert_job(model_id, "failed")
    client.get(f"/v1/jobs/{job_id}")
    client.get("/v1/jobs/job_missing")
    client.get("/no/such/route")
    text = client.get("/metrics").text
    assert 'modelpress_jobs{status="failed"} 2.0' in text and 'modelpress_jobs{status="running"} 0.0' in text
    assert 'modelpress_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"} 1.0' in text
    assert 'modelpress_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0' in text
    assert 'route="unmatched",status="404"' in text
    assert 'modelpress_http_request_duration_seconds_count{method="GET",route="/v1/jobs/{job_id}"} 2.0' in text


def test_readyz_asks_the_configured_store(pg_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The storage check is the backend's own: an unhealthy store, or a URL no backend serves, is named."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from models.settings import get_settings
    from tests.storage import memory

    store = memory.install(monkeypatch, tmp_path / "staging")
    store.healthy = False
    try:
        with TestClient(create_app(), raise_server_exceptions=False) as c:
            r = c.get("/readyz")
            assert r.status_code == 503
            assert r.json()["errors"] == [{"field": "storage", "message": "ConnectionError: memory store marked unhealthy"}]
            monkeypatch.setenv("MODELPRESS_STORAGE_URL", "gcs://bucket/blobs")
            get_settings.cache_clear()
            r = c.get("/readyz")
            assert r.status_code == 503 and [e["field"] for e in r.json()["errors"]] == ["storage"]
            assert "unknown scheme gcs://" in r.json()["errors"][0]["message"]
    finally:
        get_settings.cache_clear()


def test_readyz_checks_the_s3_bucket(pg_env: str, s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On S3 the storage check is the bucket (created when missing); S3 down is a 503 naming the bucket."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from storage import backends, get_store
    from storage.s3 import S3BlobStore

    bucket = s3_env.removeprefix("s3://").split("/")[0]
    with TestClient(create_app(), raise_server_exceptions=False) as c:
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["checks"]["storage"] == "ok", r.text
        store = get_store()
        assert isinstance(store, S3BlobStore)
        assert store.client.head_bucket(Bucket=bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
        monkeypatch.setattr(backends, "_STORES", {})
        t0 = time.monotonic()
        r = c.get("/readyz")
        assert r.status_code == 503 and time.monotonic() - t0 < 5
        (err,) = r.json()["errors"]
        assert err["field"] == "storage" and f"S3 bucket {bucket!r} unavailable" in err["message"]
        assert dead not in r.text  # /readyz is public: no endpoint in the answer


def test_with_closed_docs_an_authenticated_caller_still_reads_the_api_document(
    pg_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.main import create_app
    from models.settings import get_settings
    from tests.api.tenants import make_key

    monkeypatch.setenv("MODELPRESS_API_KEY", "sekrit")
    get_settings.cache_clear()
    _, reader = make_key("alice", "read")
    with TestClient(create_app(), raise_server_exceptions=False) as c:
        for key in ("sekrit", reader):  # the bootstrap admin key and an owner's read key
            r = c.get("/openapi.json", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200 and "/v1/jobs" in r.json()["paths"]
        wrong = c.get("/openapi.json", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 404 and wrong.json()["code"] == "not_found"
        assert c.get("/docs").status_code == 404  # the pages stay closed
