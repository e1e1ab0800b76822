"""api.services.ratelimit: per-key token buckets on uploads and submissions, per process or shared in Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from api.errors import ProblemError
from api.services import ratelimit
from models.db import session_scope
from models.settings import Settings, get_settings
from models.tables import Job, Model
from tests.api import builders
from tests.api.conftest import blobs, temp_files
from tests.api.tenants import BOOTSTRAP, bearer, make_key


def test_a_bucket_gives_its_burst_then_refills_at_its_rate() -> None:
    buckets = ratelimit.LocalBuckets()
    limit = ratelimit.Limit(rate=1.0, burst=3)
    assert [buckets.take("k", limit, now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("k", limit, now=100.0) == pytest.approx(1.0)
    assert buckets.take("k", limit, now=100.5) == pytest.approx(0.5)
    assert buckets.take("k", limit, now=101.0) == 0.0
    assert buckets.take("other", limit, now=101.0) == 0.0  # one bucket per key
    assert [buckets.take("k", limit, now=1000.0) for _ in range(4)][-1] > 0  # never more than the burst


@pytest.fixture
def limited(pg_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The API with bursts of 2 uploads and 1 submission per key, refilled at 6 per minute."""
    from api.main import create_app

    ratelimit.LOCAL.clear()
    monkeypatch.setenv("MODELPRESS_API_KEY", BOOTSTRAP)
    for action, burst in (("UPLOAD", "2"), ("SUBMIT", "1")):
        monkeypatch.setenv(f"MODELPRESS_{action}_RATE_PER_MINUTE", "6")
        monkeypatch.setenv(f"MODELPRESS_{action}_RATE_BURST", burst)
    get_settings.cache_clear()
    with TestClient(create_app(), raise_server_exceptions=False) as c:
        yield c
    get_settings.cache_clear()
    ratelimit.LOCAL.clear()


def _upload(client: TestClient, key: str, seed: int) -> int:
    r = client.put("/v1/models", params={"format": "onnx"}, content=builders.onnx_bytes(seed=seed),
                   headers=bearer(key))
    return r.status_code


def test_uploads_past_the_burst_are_429_with_retry_after_and_store_nothing(
    limited: TestClient, storage_dir: Path
) -> None:
    _, alice = make_key("alice")
    _, alice2 = make_key("alice")
    assert [_upload(limited, alice, seed) for seed in (1, 2)] == [201, 201]
    r = limited.put("/v1/models", params={"format": "onnx"}, content=builders.onnx_bytes(seed=3),
                    headers=bearer(alice))
    assert r.status_code == 429 and r.headers["content-type"] == "application/problem+json"
    assert 1 <= int(r.headers["retry-after"]) <= 10
    body = r.json()
    assert body["code"] == "rate_limited" and "uploads" in body["detail"] and "6 per minute" in body["detail"]
    assert body["errors"][0]["limit"] == 6 and body["errors"][0]["burst"] == 2
    assert temp_files(storage_dir) == [] and len(blobs(storage_dir)) == 2
    with session_scope() as s:
        assert s.query(Model).count() == 2
    # A multipart upload draws on the same bucket; another key of the same owner has its own.
    multipart = limited.post("/v1/models", files={"file": ("m.onnx", builders.onnx_bytes(seed=4))},
                             data={"format": "onnx"}, headers=bearer(alice))
    assert multipart.status_code == 429
    assert _upload(limited, alice2, 5) == 201
    # Reads are not limited.
    assert all(limited.get("/v1/models", headers=bearer(alice)).status_code == 200 for _ in range(5))


def test_submissions_have_their_own_bucket(limited: TestClient) -> None:
    _, alice = make_key("alice")
    model_id = builders.insert_model(owner="alice")
    spec = {"model": model_id, "steps": [{"type": "quantize"}]}
    assert limited.post("/v1/jobs", json=spec, headers=bearer(alice)).status_code == 202
    r = limited.post("/v1/jobs", json=spec, headers=bearer(alice))
    assert r.status_code == 429 and r.json()["code"] == "rate_limited" and "job submissions" in r.json()["detail"]
    assert int(r.headers["retry-after"]) >= 1
    with session_scope() as s:
        assert s.query(Job).count() == 1
    assert _upload(limited, alice, 7) == 201  # the upload bucket is untouched
    # The bootstrap key has a bucket of its own too.
    boot = limited.post("/v1/jobs", json={"model": builders.insert_model(), "steps": [{"type": "quantize"}]},
                        headers=bearer(BOOTSTRAP))
    assert boot.status_code == 202


def test_with_a_redis_broker_every_process_shares_the_buckets(redis_url: str, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, broker_url=redis_url, database_url=f"sqlite:///{tmp_path / uuid.uuid4().hex}",
                        upload_rate_per_minute=60, upload_rate_burst=2)
    assert ratelimit.uses_redis(settings)
    name = ratelimit.bucket_name(settings, "upload", "key_x")
    try:
        assert ratelimit.wait_for(settings, "upload", "key_x") == 0.0
        ratelimit.LOCAL.clear()  # what another process would have: nothing local
        assert ratelimit.wait_for(settings, "upload", "key_x") == 0.0
        ratelimit.LOCAL.clear()
        wait = ratelimit.wait_for(settings, "upload", "key_x")
        assert 0.5 < wait <= 1.0
        ttl = redis.Redis.from_url(redis_url).ttl(name)
        assert 0 < ttl <= 62
        with pytest.raises(ProblemError) as refused:
            ratelimit.check(settings, "upload", "key_x")
        assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
        # A deployment with another database has buckets of its own.
        other = settings.model_copy(update={"database_url": settings.database_url + "-other"})
        assert ratelimit.wait_for(other, "upload", "key_x") == 0.0
    finally:
        client = redis.Redis.from_url(redis_url)
        client.delete(name, ratelimit.bucket_name(
            settings.model_copy(update={"database_url": settings.database_url + "-other"}), "upload", "key_x"))


def test_a_redis_that_does_not_answer_falls_back_to_this_process(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, broker_url="redis://127.0.0.1:1/0", database_url=f"sqlite:///{tmp_path}/x.db",
                        submit_rate_per_minute=60, submit_rate_burst=1)
    ratelimit.LOCAL.clear()
    assert ratelimit.wait_for(settings, "submit", "k") == 0.0
    assert ratelimit.wait_for(settings, "submit", "k") > 0.5
    ratelimit.LOCAL.clear()


def test_a_rate_of_zero_is_off(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, upload_rate_per_minute=0, upload_rate_burst=1)
    assert ratelimit.limit_for(settings, "upload") is None
    assert all(ratelimit.wait_for(settings, "upload", "k") == 0.0 for _ in range(50))
