"""DELETE of models, datasets, jobs and artifacts: owner-checked, rows first, blobs only once unreferenced."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from models.db import session_scope
from models.ids import new_id
from models.tables import Artifact, BlobOrphan, Job, JobEvent, Model
from tests.api import builders
from tests.api.conftest import blobs


def _blob_path(root: Path, data: bytes) -> Path:
    key = hashlib.sha256(data).hexdigest()
    return root / key[:2] / key[2:4] / key


def _upload_model(client: TestClient, seed: int = 0) -> tuple[str, bytes]:
    data = builders.onnx_bytes(seed=seed)
    r = client.put("/v1/models?format=onnx&name=m", content=data)
    assert r.status_code == 201, r.text
    return r.json()["id"], data


def _count(table: type) -> int:
    with session_scope() as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


def _problem(r: object, status: int, code: str) -> dict:
    assert r.status_code == status, r.text  # type: ignore[attr-defined]
    assert r.headers["content-type"].startswith("application/problem+json")  # type: ignore[attr-defined]
    body = r.json()  # type: ignore[attr-defined]
    assert body["code"] == code and body["status"] == status
    return body


def test_delete_model_removes_row_and_unshared_blob(client: TestClient, storage_dir: Path) -> None:
    model_id, data = _upload_model(client)
    assert _blob_path(storage_dir, data).is_file()
    r = client.delete(f"/v1/models/{model_id}")
    assert r.status_code == 204 and r.content == b""
    assert not _blob_path(storage_dir, data).exists() and blobs(storage_dir) == []
    _problem(client.get(f"/v1/models/{model_id}"), 404, "not_found")
    _problem(client.delete(f"/v1/models/{model_id}"), 404, "not_found")
    assert _count(BlobOrphan) == 0


def test_blob_shared_with_another_owner_stays(client: TestClient, storage_dir: Path) -> None:
    model_id, data = _upload_model(client)
    key = hashlib.sha256(data).hexdigest()
    with session_scope() as s:  # the same bytes uploaded by someone else: one shared blob
        s.add(Model(id=new_id("mdl"), owner="other", name="theirs", format="onnx", sha256=key,
                    size_bytes=len(data), storage_key=key, meta={}))
    assert client.delete(f"/v1/models/{model_id}").status_code == 204
    assert _blob_path(storage_dir, data).read_bytes() == data
    assert _count(BlobOrphan) == 0  # referenced: nothing left pending


def test_blob_referenced_by_an_artifact_stays(client: TestClient, storage_dir: Path) -> None:
    model_id, data = _upload_model(client)
    other_model = builders.insert_model()
    job = builders.insert_job(other_model, status="succeeded")
    builders.insert_artifact(job, data)  # a job produced the same bytes
    assert client.delete(f"/v1/models/{model_id}").status_code == 204
    assert _blob_path(storage_dir, data).is_file()


def test_another_owners_records_are_404_and_untouched(client: TestClient) -> None:
    theirs = builders.insert_model(owner="other")
    job = builders.insert_job(theirs, status="succeeded", owner="other")
    art = builders.insert_artifact(job, b"their bytes", owner="other")
    ds = builders.insert_dataset(owner="other")
    for url in (f"/v1/models/{theirs}", f"/v1/jobs/{job}", f"/v1/artifacts/{art}", f"/v1/datasets/{ds}"):
        body = _problem(client.delete(url), 404, "not_found")
        assert "other" not in body["detail"]
    assert _count(Job) == 1 and _count(Artifact) == 1 and _count(Model) == 1


def test_model_used_by_a_job_is_409_naming_it(client: TestClient, storage_dir: Path) -> None:
    model_id, data = _upload_model(client)
    job = builders.insert_job(model_id, status="succeeded")
    body = _problem(client.delete(f"/v1/models/{model_id}"), 409, "model_in_use")
    assert job in body["detail"]
    assert client.get(f"/v1/models/{model_id}").status_code == 200 and _blob_path(storage_dir, data).is_file()
    assert client.delete(f"/v1/jobs/{job}").status_code == 204
    assert client.delete(f"/v1/models/{model_id}").status_code == 204


def test_dataset_used_by_an_unfinished_job_is_409(client: TestClient, storage_dir: Path) -> None:
    import numpy as np

    data = builders.npz_bytes({"x": np.zeros((4, 4), np.float32)})
    ds = client.put("/v1/datasets?format=npz", content=data).json()["id"]
    model_id = builders.insert_model()
    job = builders.insert_job(model_id, status="running")
    with session_scope() as s:
        row = s.get(Job, job)
        assert row is not None
        row.spec = {"model": model_id, "data": {"eval": ds}}
    body = _problem(client.delete(f"/v1/datasets/{ds}"), 409, "dataset_in_use")
    assert job in body["detail"]
    builders.set_status(job, "succeeded")  # finished jobs keep only the id
    assert client.delete(f"/v1/datasets/{ds}").status_code == 204
    assert not _blob_path(storage_dir, data).exists()


def test_delete_finished_job_takes_events_and_artifacts(client: TestClient, storage_dir: Path) -> None:
    model_id = builders.insert_model()
    job = builders.insert_job(model_id, status="succeeded")
    builders.add_events(job, 3)
    a1 = builders.insert_artifact(job, b"model bytes", name="model.onnx")
    builders.insert_artifact(job, b"{}", name="report.json")
    keep = builders.insert_job(model_id, status="failed")
    kept_art = builders.insert_artifact(keep, b"other job")
    r = client.delete(f"/v1/jobs/{job}")
    assert r.status_code == 204
    _problem(client.get(f"/v1/jobs/{job}"), 404, "not_found")
    _problem(client.get(f"/v1/artifacts/{a1}"), 404, "not_found")
    with session_scope() as s:
        assert s.scalar(select(func.count()).where(JobEvent.job_id == job)) == 0
        assert s.scalars(select(Artifact.id)).all() == [kept_art]
    assert not _blob_path(storage_dir, b"model bytes").exists() and not _blob_path(storage_dir, b"{}").exists()
    assert _blob_path(storage_dir, b"other job").is_file()


def test_delete_queued_job_cancels_and_deletes_it(client: TestClient) -> None:
    job = builders.insert_job(builders.insert_model(), status="queued")
    assert client.delete(f"/v1/jobs/{job}").status_code == 204
    assert client.get(f"/v1/jobs/{job}").status_code == 404


def test_delete_running_job_asks_cancel_and_answers_202(client: TestClient) -> None:
    job = builders.insert_job(builders.insert_model(), status="running")
    r = client.delete(f"/v1/jobs/{job}")
    assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{job}"
    assert r.json()["id"] == job and r.json()["status"] == "cancelling"
    with session_scope() as s:
        row = s.get(Job, job)
        assert row is not None and row.delete_requested and row.cancel_requested
    again = client.delete(f"/v1/jobs/{job}")  # still stopping: same answer, nothing else changes
    assert again.status_code == 202 and again.json()["status"] == "cancelling"


def test_delete_artifact_keeps_its_job(client: TestClient, storage_dir: Path) -> None:
    job = builders.insert_job(builders.insert_model(), status="succeeded")
    art = builders.insert_artifact(job, b"artifact bytes")
    assert client.delete(f"/v1/artifacts/{art}").status_code == 204
    _problem(client.get(f"/v1/artifacts/{art}/content"), 404, "not_found")
    assert client.get(f"/v1/jobs/{job}").status_code == 200
    assert not _blob_path(storage_dir, b"artifact bytes").exists()


def test_concurrent_upload_and_delete_of_the_same_bytes_never_orphan_a_record(client: TestClient) -> None:
    """Uploads and deletes of the same bytes race; afterwards every record still has its blob."""
    import threading

    from api.services import deletion, uploads
    from storage import get_store

    store = get_store()
    data = builders.onnx_bytes(seed=3)
    key = hashlib.sha256(data).hexdigest()
    failures: list[BaseException] = []
    stop = threading.Event()

    def upload_loop() -> None:
        try:
            for _ in range(25):
                with store.stage([data]) as staged:
                    up = uploads.record("model", store, staged, "local", "racy", "onnx")
                assert up.row.storage_key == key
        except BaseException as exc:
            failures.append(exc)
        finally:
            stop.set()

    def delete_loop() -> None:
        try:
            while not stop.is_set():
                with session_scope() as s:
                    ids = list(s.scalars(select(Model.id).where(Model.sha256 == key)))
                for model_id in ids:
                    with session_scope() as s:
                        try:
                            deletion.delete_model(s, "local", model_id)
                        except Exception as exc:  # deleted by the other pass meanwhile: a 404
                            if getattr(exc, "status", None) != 404:
                                raise
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=upload_loop), threading.Thread(target=delete_loop)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    with session_scope() as s:
        rows = s.scalars(select(Model).where(Model.sha256 == key)).all()
    assert all(store.exists(r.storage_key) for r in rows)
    for r in rows:
        assert client.delete(f"/v1/models/{r.id}").status_code == 204
    assert not store.exists(key) and _count(BlobOrphan) == 0


def test_deleting_a_parent_keeps_its_children_as_jobs_of_their_own(client: TestClient) -> None:
    """A search's trials or a multi-task job's baselines outlive their parent's deletion (a cached baseline may
    stand for another job's)."""
    from models.db import session_scope
    from models.tables import Job

    model_id = builders.insert_model()
    parent, child = builders.insert_job(model_id, status="succeeded"), builders.insert_job(model_id, status="succeeded")
    with session_scope() as s:
        row = s.get(Job, child)
        assert row is not None
        row.parent_id = parent
    assert client.delete(f"/v1/jobs/{parent}").status_code in (200, 204)
    assert client.get(f"/v1/jobs/{parent}").status_code == 404
    kept = client.get(f"/v1/jobs/{child}")
    assert kept.status_code == 200 and kept.json()["status"] == "succeeded"
