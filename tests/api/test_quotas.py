"""api.services.quotas: stored bytes per owner (413) and queued + running jobs per owner (429)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from api.errors import ProblemError
from api.services import quotas
from models.db import session_scope
from models.settings import get_settings
from models.tables import Dataset, Job, Model
from tests.api import builders
from tests.api.conftest import blobs, temp_files
from tests.api.tenants import BOOTSTRAP, bearer, make_key

PROBLEM = "application/problem+json"


@pytest.fixture
def quota_client(pg_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The API with the bootstrap key, a 2000-byte storage quota and 2 active jobs per owner."""
    from api.main import create_app

    monkeypatch.setenv("MODELPRESS_API_KEY", BOOTSTRAP)
    monkeypatch.setenv("MODELPRESS_QUOTA_STORED_BYTES", "2000")
    monkeypatch.setenv("MODELPRESS_QUOTA_ACTIVE_JOBS", "2")
    get_settings.cache_clear()
    with TestClient(create_app(), raise_server_exceptions=False, headers=bearer(BOOTSTRAP)) as c:
        yield c
    get_settings.cache_clear()


def _put_model(client: TestClient, data: bytes, **headers: str) -> dict[str, object]:
    r = client.put("/v1/models", params={"name": "m", "format": "onnx"}, content=data, headers=headers)
    return {"status": r.status_code, "body": r.json(), "type": r.headers["content-type"]}


def test_stored_bytes_count_each_owners_records_of_a_shared_blob(pg_env: str) -> None:
    job = builders.insert_job(builders.insert_model(owner="alice"), owner="alice")
    builders.insert_artifact(job, b"x" * 100, owner="alice")
    builders.insert_artifact(job, b"x" * 100, name="copy.onnx", owner="alice")  # same blob, two records
    builders.insert_dataset(owner="alice")
    builders.insert_model(owner="bob")
    with session_scope() as s:
        assert quotas.stored_bytes(s, "alice") == 1 + 100 + 100 + 1
        assert quotas.stored_bytes(s, "bob") == 1 and quotas.stored_bytes(s, "carol") == 0


def test_an_upload_past_the_storage_quota_is_413_naming_it_and_stores_nothing(
    quota_client: TestClient, storage_dir: Path
) -> None:
    first = builders.onnx_bytes(in_features=16, out_features=16, seed=1)  # ~1.2 kB
    second = builders.onnx_bytes(in_features=16, out_features=16, seed=2)
    assert 1000 < len(first) <= 2000 and len(first) + len(second) > 2000
    ok = _put_model(quota_client, first)
    assert ok["status"] == 201
    stored = sorted(blobs(storage_dir))
    over = _put_model(quota_client, second)
    assert over["status"] == 413 and over["type"] == PROBLEM
    body = over["body"]
    assert isinstance(body, dict) and body["code"] == "storage_quota_exceeded"
    assert str(len(first)) in body["detail"] and "2000" in body["detail"] and "'local'" in body["detail"]
    assert body["errors"] == [{"field": "quota.stored_bytes", "quota": "stored_bytes", "limit": 2000,
                               "usage": len(first), "requested": len(second),
                               "message": f"{len(first)} of 2000 bytes in use, {len(second)} requested"}]
    assert sorted(blobs(storage_dir)) == stored and temp_files(storage_dir) == []
    with session_scope() as s:
        assert s.query(Model).count() == 1
    # The same bytes again add nothing: the existing record, even at the quota.
    again = _put_model(quota_client, first)
    assert again["status"] == 200 and isinstance(again["body"], dict) and again["body"]["id"] == ok["body"]["id"]  # type: ignore[index]
    # Another owner has a quota of their own.
    _, bob = make_key("bob")
    assert _put_model(quota_client, second, Authorization=f"Bearer {bob}")["status"] == 201


def test_the_storage_quota_counts_artifacts_and_datasets_too(quota_client: TestClient) -> None:
    job = builders.insert_job(builders.insert_model())
    builders.insert_artifact(job, b"a" * 1900)
    data = builders.npz_bytes({"x": np.zeros((4, 4), np.float32)})
    r = quota_client.put("/v1/datasets", params={"format": "npz"}, content=data)
    assert r.status_code == 413 and r.json()["errors"][0]["usage"] == 1901
    with session_scope() as s:
        assert s.query(Dataset).count() == 0


def _submit(client: TestClient, model_id: str, **headers: str) -> tuple[int, dict[str, object]]:
    r = client.post("/v1/jobs", json={"model": model_id, "steps": [{"type": "quantize"}]}, headers=headers)
    return r.status_code, r.json()


def test_a_submission_past_the_active_jobs_quota_is_429_until_one_finishes(quota_client: TestClient) -> None:
    model_id = builders.insert_model()
    builders.insert_job(model_id, status="succeeded")  # finished jobs do not count
    builders.insert_job(model_id, status="failed")
    assert _submit(quota_client, model_id)[0] == 202
    assert _submit(quota_client, model_id, **{"Idempotency-Key": "k1"})[0] == 202
    status, body = _submit(quota_client, model_id)
    assert status == 429 and body["code"] == "job_quota_exceeded"
    assert body["errors"] == [{"field": "quota.active_jobs", "quota": "active_jobs", "limit": 2, "usage": 2,
                               "message": "2 of 2 jobs queued or running"}]
    assert "'local'" in str(body["detail"]) and "2" in str(body["detail"])
    with session_scope() as s:
        assert s.query(Job).filter(Job.status == "queued").count() == 2
    # Repeating a submission that was accepted answers with its job, quota or not.
    assert _submit(quota_client, model_id, **{"Idempotency-Key": "k1"})[0] == 200
    # Another owner is not held up by this one.
    _, bob = make_key("bob")
    assert _submit(quota_client, builders.insert_model(owner="bob"), Authorization=f"Bearer {bob}")[0] == 202
    queued = quota_client.get("/v1/jobs", params={"status": "queued"}).json()["data"]
    assert quota_client.post(f"/v1/jobs/{queued[0]['id']}/cancel").status_code == 200
    assert _submit(quota_client, model_id)[0] == 202


def test_quotas_of_zero_are_off(pg_env: str) -> None:
    model_id = builders.insert_model()
    builders.insert_job(model_id)
    on = get_settings().model_copy(update={"quota_stored_bytes": 1, "quota_active_jobs": 1})
    off = get_settings().model_copy(update={"quota_stored_bytes": 0, "quota_active_jobs": 0})
    with session_scope() as s:
        with pytest.raises(ProblemError) as stored:
            quotas.check_storage(s, "local", 10, on)
        with pytest.raises(ProblemError) as jobs:
            quotas.check_jobs(s, "local", on)
        assert (stored.value.status, jobs.value.status) == (413, 429)
        quotas.check_storage(s, "local", 10**15, off)
        quotas.check_jobs(s, "local", off)


def test_the_owner_lock_holds_until_the_transaction_ends(pg_env: str) -> None:
    key = int.from_bytes(hashlib.sha256(b"modelpress quota alice").digest()[:8], "big", signed=True)
    probe = "SELECT pg_try_advisory_xact_lock(:key)"
    with session_scope() as holder:
        quotas.lock_owner(holder, "alice")
        with session_scope() as other:
            assert other.execute(text(probe), {"key": key}).scalar() is False
            quotas.lock_owner(other, "bob")  # another owner is not held up
    with session_scope() as other:
        assert other.execute(text(probe), {"key": key}).scalar() is True


def test_concurrent_submissions_cannot_both_slip_under_the_quota(
    pg_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from api.main import create_app

    monkeypatch.setenv("MODELPRESS_QUOTA_ACTIVE_JOBS", "1")
    get_settings.cache_clear()
    model_id = builders.insert_model()
    barrier = Barrier(4)
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        def submit(_: int) -> int:
            barrier.wait()
            return _submit(client, model_id)[0]

        with ThreadPoolExecutor(4) as pool:
            codes = sorted(pool.map(submit, range(4)))
    assert codes == [202, 429, 429, 429]
    with session_scope() as s:
        assert s.query(Job).count() == 1
