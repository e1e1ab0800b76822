"""GET /v1/jobs/{id}'s fast path builds the same body as the full JobOut, and its micro-cache stays honest."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import update

from api.services import jobs as job_service
from models.db import session_scope
from models.ids import new_id
from models.tables import Artifact, Job, Model, utcnow


def _job_with_artifacts() -> str:
    with session_scope() as s:
        m = Model(id=new_id("mdl"), owner="local", name="m", format="onnx", sha256="1" * 64, size_bytes=3,
                  storage_key="1" * 64, meta={})
        s.add(m)
        s.flush()
        job = Job(id=new_id("job"), owner="local", status="failed", phase="failed", model_id=m.id, queue="cpu",
                  spec={"model": m.id, "steps": [{"type": "quantize", "mode": "dynamic"}]},
                  progress={"step": 3, "steps": 3, "percent": 100.0, "metrics": {"loss": 0.5}}, attempt=1,
                  error={"code": "accuracy_budget_exceeded", "message": "dropped", "step": "evaluate"},
                  result={"artifact_ids": [], "report": {"gains": {"size_ratio": 3.9}}},
                  started_at=utcnow(), finished_at=utcnow())
        s.add(job)
        s.flush()
        for name in ("report.json", "model.onnx"):
            s.add(Artifact(id=new_id("art"), owner="local", job_id=job.id, name=name, kind="model",
                           media_type="application/octet-stream", sha256="2" * 64, size_bytes=10,
                           storage_key="2" * 64, meta={"attempt": 1}))
        return job.id


def test_fast_path_matches_the_full_response_model(pg_env: str) -> None:
    job_id = _job_with_artifacts()
    fast = json.loads(job_service.read_job_json("local", job_id))
    with session_scope() as s:
        full = job_service.job_out(s, job_service.get_job(s, "local", job_id)).model_dump(mode="json")
    # The stored spec is the validated dump made at submit time; compare the rest field by field.
    full.pop("spec"), fast.pop("spec")
    assert fast == full
    assert [a["name"] for a in fast["result"]["artifacts"]] == ["model.onnx", "report.json"]


def test_unknown_or_foreign_job_is_404(pg_env: str) -> None:
    from api.errors import ProblemError

    job_id = _job_with_artifacts()
    for owner, jid in (("local", "job_missing"), ("someone-else", job_id)):
        with pytest.raises(ProblemError) as e:
            job_service.read_job_json(owner, jid)
        assert e.value.status == 404


def test_micro_cache_serves_for_its_ttl_then_refreshes(pg_env: str) -> None:
    job_id = _job_with_artifacts()
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status="running", phase="training"))
    first = json.loads(job_service.read_job_json("local", job_id, cache_s=0.3))
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == job_id).values(phase="training epoch 2/3"))
    assert json.loads(job_service.read_job_json("local", job_id, cache_s=0.3))["phase"] == first["phase"]
    assert job_service.READ_CACHE.get("someone-else", job_id) is None  # never served across owners
    time.sleep(0.35)
    assert json.loads(job_service.read_job_json("local", job_id, cache_s=0.3))["phase"] == "training epoch 2/3"
    job_service.READ_CACHE.drop(job_id)


def test_cancel_through_the_api_is_seen_at_once_despite_the_cache(
    pg_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_JOB_READ_CACHE_S", "30")
    get_settings.cache_clear()
    job_id = _job_with_artifacts()
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status="queued", error=None, result=None))
    with TestClient(create_app()) as client:
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # now cached for 30 s
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_a_job_deleted_while_running_is_404_once_the_worker_removed_it_despite_the_cache(
    pg_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from models.purge import purge_jobs
    from models.settings import get_settings
    from tests.api import builders

    monkeypatch.setenv("MODELPRESS_JOB_READ_CACHE_S", "30")
    get_settings.cache_clear()
    job_id = builders.insert_job(builders.insert_model(), status="running")
    with TestClient(create_app()) as client:
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        deleting = client.delete(f"/v1/jobs/{job_id}")
        assert deleting.status_code == 202 and deleting.json()["status"] == "cancelling"
        builders.set_status(job_id, "cancelled")  # the worker stops it ...
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
        with session_scope() as s:  # ... and its gc deletes it
            purge_jobs(s, [job_id])
        gone = client.get(f"/v1/jobs/{job_id}")
        assert gone.status_code == 404 and gone.json()["code"] == "not_found"


def test_a_finished_job_deleted_through_this_process_is_404_at_once_despite_the_cache(
    pg_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_JOB_READ_CACHE_S", "30")
    get_settings.cache_clear()
    job_id = _job_with_artifacts()
    with TestClient(create_app()) as client:
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "failed"  # now cached (a terminal job: longer)
        assert job_service.READ_CACHE.get("local", job_id) is not None
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
        gone = client.get(f"/v1/jobs/{job_id}")
        assert gone.status_code == 404 and gone.json()["code"] == "not_found"
        assert client.get(f"/v1/jobs/{job_id}/events").status_code == 404


def test_a_read_that_began_before_a_drop_does_not_cache_the_old_body(pg_env: str) -> None:
    cache = job_service._ReadCache()
    began = time.monotonic()
    cache.drop("job_x")  # a DELETE committed while the read was querying
    cache.put("local", "job_x", b"old", 60.0, read_at=began)
    assert cache.get("local", "job_x") is None
    cache.put("local", "job_x", b"new", 60.0, read_at=time.monotonic())
    assert cache.get("local", "job_x") == b"new"
