"""Jobs: validation (422 naming fields), create/get/list, idempotency, queues, cancel, broker failure."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from models.db import session_scope
from models.tables import Job, JobEvent
from tests.api import builders
from worker.celery_app import enqueue_job as REAL_ENQUEUE


@pytest.fixture(autouse=True)
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record enqueues; each one must find its job already committed (enqueue after commit)."""
    import worker.celery_app

    calls: list[tuple[str, str]] = []

    def record(job_id: str, queue: str) -> None:
        with session_scope() as s:
            job = s.get(Job, job_id)
            assert job is not None and job.status == "queued" and job.queue == queue
        calls.append((job_id, queue))

    monkeypatch.setattr(worker.celery_app, "enqueue_job", record)
    return calls


def _upload_model(client: TestClient, **kw: Any) -> dict[str, Any]:
    r = client.put("/v1/models", params={"format": "onnx"}, content=builders.onnx_bytes(**kw))
    assert r.status_code in (200, 201), r.text
    return r.json()


def _upload_npz(client: TestClient, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    r = client.put("/v1/datasets", params={"format": "npz"}, content=builders.npz_bytes(arrays))
    assert r.status_code in (200, 201), r.text
    return r.json()


def _jobs() -> int:
    with session_scope() as s:
        return int(s.scalar(select(func.count()).select_from(Job)) or 0)


def test_create_get_and_events(client: TestClient, enqueued: list[tuple[str, str]]) -> None:
    model = _upload_model(client)
    ds = _upload_npz(client, {"x": np.ones((8, 4), np.float32), "labels": np.arange(8) % 3})
    spec = {"model": model["id"], "task": "image-classification", "data": {"eval": ds["id"]},
            "steps": [{"type": "quantize", "mode": "dynamic"}]}
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert enqueued == [(job["id"], job["queue"])]
    assert job["status"] == "queued" and job["attempt"] == 0 and job["queue"].startswith("cpu-")
    assert job["spec"]["steps"][0]["mode"] == "dynamic" and job["progress"]["steps"] == 1
    assert job["error"] is None and job["result"] is None
    got = client.get(f"/v1/jobs/{job['id']}").json()
    assert got["id"] == job["id"] and got["timestamps"]["finished_at"] is None
    events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert [(e["kind"], e["data"]) for e in events] == [("status", {"status": "queued"})]
    with session_scope() as s:
        row = s.get(Job, job["id"])
        assert row is not None and row.max_attempts == 3 and row.model_id == model["id"]


def test_training_jobs_go_to_the_gpu_queue(client: TestClient) -> None:
    model = _upload_model(client)
    ds = _upload_npz(client, {"x": np.ones((8, 4), np.float32), "labels": np.arange(8) % 3})
    r = client.post("/v1/jobs", json={"model": model["id"], "data": {"train": ds["id"]},
                                      "steps": [{"type": "finetune", "epochs": 1}]})
    assert r.status_code == 202 and r.json()["queue"].startswith("gpu-")
    # The API sees no GPU: the event names the queue and what it is for, never "queued on gpu".
    (event,) = client.get(f"/v1/jobs/{r.json()['id']}/events").json()["data"]
    assert not event["message"].startswith("queued on") and "training worker" in event["message"]
    assert "or on its CPU where it has none" in event["message"]
    r = client.post("/v1/jobs", json={"model": model["id"], "queue": "gpu", "steps": [{"type": "quantize"}]})
    assert r.status_code == 202 and r.json()["queue"].startswith("gpu-")


@pytest.mark.parametrize(
    ("spec", "field", "needle"),
    [
        ({"model": "mdl_missing"}, "model", "unknown model"),
        ({"steps": [{"type": "sparsify"}]}, "steps.0", "sparsify"),
        ({"steps": [{"type": "prune", "ratio": 1.5}]}, "steps.0.ratio", "less than 1"),
        ({"steps": [{"type": "finetune"}]}, "steps.0", "needs data.train"),
        ({"steps": [{"type": "quantize"}, {"type": "prune"}]}, "steps.1", "cannot follow"),
        ({"steps": [{"type": "finetune", "mode": "last_n"}], "data": {"train": "ds_x"}}, "steps.0", "last_n"),
        ({"data": {"eval": "ds_missing"}}, "data.eval", "unknown dataset"),
        ({"steps": [{"type": "distill", "teacher": "mdl_t"}], "data": {"train": "ds_x"}}, "data.train", "unknown"),
        ({"unknown_key": 1}, "unknown_key", "Extra inputs"),
        ({"search": {"constraints": {"min_fidelity": 0.9}}}, "search.constraints.min_fidelity", "data.eval"),
        ({"search": {"space": [[{"type": "distill"}]]}}, "search.space.0", "needs data.train"),
        ({"search": {}, "steps": [{"type": "quantize"}]}, "steps", "must be empty"),
        ({"search": {"parallelism": 0}}, "search.parallelism", "greater than or equal to 1"),
        ({"search": {"budget": {"max_trials": 65}}}, "search.budget.max_trials", "less than or equal to 64"),
    ],
)
def test_spec_errors_name_the_field(client: TestClient, spec: dict[str, Any], field: str, needle: str) -> None:
    model = _upload_model(client)
    body = {"model": model["id"], **spec}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    problem = r.json()
    assert r.headers["content-type"].startswith("application/problem+json")
    assert problem["code"] == "validation_error"
    assert problem["errors"][0]["field"] == field, problem
    assert problem["detail"].startswith(f"{field}: ") and needle in problem["detail"], problem
    assert _jobs() == 0


def test_a_search_trial_with_an_unknown_teacher_is_422_naming_the_trial(client: TestClient) -> None:
    model = _upload_model(client)
    ds = _upload_npz(client, {"x": np.ones((8, 4), np.float32)})
    space = [[{"type": "quantize"}], [{"type": "distill", "teacher": "mdl_teacher"}]]
    r = client.post("/v1/jobs", json={"model": model["id"], "data": {"train": ds["id"]}, "search": {"space": space}})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json"), r.text
    assert r.json()["errors"][0]["field"] == "search.space.1.steps.0.teacher"
    assert "unknown model 'mdl_teacher'" in r.json()["detail"]
    assert _jobs() == 0


def test_teacher_and_student_ids_are_checked(client: TestClient) -> None:
    model = _upload_model(client)
    ds = _upload_npz(client, {"x": np.ones((8, 4), np.float32)})
    steps = [{"type": "distill", "teacher": "mdl_teacher", "student": {"model": "mdl_student"}}]
    r = client.post("/v1/jobs", json={"model": model["id"], "data": {"train": ds["id"]}, "steps": steps})
    assert r.status_code == 422
    assert [e["field"] for e in r.json()["errors"]] == ["steps.0.teacher", "steps.0.student.model"]


def test_npz_not_matching_the_model_is_422(client: TestClient) -> None:
    model = _upload_model(client, in_features=4, input_name="pixels")
    wrong_name = _upload_npz(client, {"x": np.ones((8, 4), np.float32)})
    wrong_shape = _upload_npz(client, {"pixels": np.ones((8, 5), np.float32)})
    fits = _upload_npz(client, {"pixels": np.ones((6, 4), np.float32), "labels": np.arange(6) % 3})
    r = client.post("/v1/jobs", json={"model": model["id"], "data": {"eval": wrong_name["id"]}})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "data.eval"
    assert "'pixels'" in r.json()["detail"] and "its arrays: x" in r.json()["detail"]
    r = client.post("/v1/jobs", json={"model": model["id"], "data": {"calibration": wrong_shape["id"]},
                                      "steps": [{"type": "quantize", "mode": "static"}]})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "data.calibration"
    assert "[8, 5]" in r.json()["detail"] and "[batch, 4]" in r.json()["detail"]
    r = client.post("/v1/jobs", json={"model": model["id"], "data": {"eval": fits["id"]}})
    assert r.status_code == 202, r.text
    too_many_classes = _upload_npz(client, {"pixels": np.ones((6, 4), np.float32), "labels": np.arange(6)})
    r = client.post("/v1/jobs", json={"model": model["id"], "task": "image-classification",
                                      "data": {"eval": too_many_classes["id"]}})
    assert r.status_code == 422 and "3 classes" in r.json()["detail"]
    assert _jobs() == 1


def test_list_pagination(client: TestClient) -> None:
    model_id = builders.insert_model()
    ids = [builders.insert_job(model_id, status=s) for s in ["queued", "running", "succeeded", "queued", "failed"]]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["after"] = cursor
        page = client.get("/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == sorted(ids, reverse=True)
    queued = client.get("/v1/jobs", params={"status": "queued"}).json()["data"]
    assert {j["id"] for j in queued} == {ids[0], ids[3]}
    bad = client.get("/v1/jobs", params={"status": "done"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "status"


def test_idempotency_key(client: TestClient, enqueued: list[tuple[str, str]]) -> None:
    model = _upload_model(client)
    spec = {"model": model["id"], "steps": [{"type": "quantize"}]}
    first = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "abc-1"})
    again = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "abc-1"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"] and _jobs() == 1 and len(enqueued) == 1
    other = client.post("/v1/jobs", json={**spec, "seed": 7}, headers={"Idempotency-Key": "abc-1"})
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    assert client.post("/v1/jobs", json=spec).status_code == 202 and _jobs() == 2


def test_cancel(client: TestClient) -> None:
    model_id = builders.insert_model()
    queued = builders.insert_job(model_id, "queued")
    r = client.post(f"/v1/jobs/{queued}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert r.json()["timestamps"]["finished_at"] is not None
    again = client.post(f"/v1/jobs/{queued}/cancel")
    assert again.status_code == 409 and again.json()["code"] == "job_terminal"
    running = builders.insert_job(model_id, "running")
    r = client.post(f"/v1/jobs/{running}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelling"
    with session_scope() as s:
        job = s.get(Job, running)
        assert job is not None and job.cancel_requested and job.finished_at is None
        kinds = [e.data.get("status") for e in s.scalars(select(JobEvent).where(JobEvent.job_id == running))]
        assert kinds == ["running", "cancelling"]
    assert client.post("/v1/jobs/job_nope/cancel").status_code == 404


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _use_broker(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    import worker.celery_app
    from models.settings import get_settings

    monkeypatch.setattr(worker.celery_app, "enqueue_job", REAL_ENQUEUE)
    monkeypatch.setenv("MODELPRESS_BROKER_URL", url)
    get_settings.cache_clear()
    worker.celery_app.get_celery.cache_clear()


@pytest.mark.parametrize("db", ["pg_env", "sqlite_env"])
def test_a_broker_that_refuses_the_task_leaves_no_job_and_answers_503(
    db: str, request: pytest.FixtureRequest, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    import worker.celery_app
    from api.main import create_app

    request.getfixturevalue(db)
    _use_broker(monkeypatch, f"redis://127.0.0.1:{_free_port()}/0")  # nothing listens there: the broker is down
    spec = {"model": "", "steps": [{"type": "quantize", "mode": "dynamic"}]}
    try:
        with TestClient(create_app(), raise_server_exceptions=False) as c:
            spec["model"] = _upload_model(c)["id"]
            r = c.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "broker-down-1"})
            assert r.status_code == 503 and r.json()["code"] == "broker_unavailable", r.text
            assert r.headers["Retry-After"] == "5" and r.headers["content-type"] == "application/problem+json"
            with session_scope() as s:  # an answer that is not 2xx leaves no job
                assert s.scalars(select(Job)).all() == [] and s.scalars(select(JobEvent)).all() == []
            assert c.get("/v1/jobs").json()["data"] == []
            _use_broker(monkeypatch, redis_url)  # the broker is back: the retry with the same key makes the job
            again = c.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "broker-down-1"})
            assert again.status_code == 202, again.text
            with session_scope() as s:
                assert [j.id for j in s.scalars(select(Job))] == [again.json()["id"]]
            conn = redis.Redis.from_url(redis_url)
            raw = conn.lpop(again.json()["queue"])
            assert raw is not None and again.json()["id"].encode() in raw
            conn.delete(again.json()["queue"], f"_kombu.binding.{again.json()['queue']}")
    finally:
        worker.celery_app.get_celery.cache_clear()


def test_job_with_artifacts_and_report(client: TestClient) -> None:
    model_id = builders.insert_model()
    job_id = builders.insert_job(model_id, "succeeded")
    art = builders.insert_artifact(job_id, b"onnx bytes")
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.result = {"report": {"input": {"size_bytes": 10}}}
        job.error = {"code": "accuracy_budget_exceeded", "message": "dropped 2%", "step": None}
    body = client.get(f"/v1/jobs/{job_id}").json()
    assert body["result"]["report"] == {"input": {"size_bytes": 10}}
    assert body["result"]["artifacts"][0]["id"] == art
    assert body["result"]["artifacts"][0]["url"] == f"/v1/artifacts/{art}/content"
    assert body["error"]["code"] == "accuracy_budget_exceeded"


def test_enqueue_reaches_a_real_redis_broker(
    client: TestClient, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    import worker.celery_app
    from models.settings import get_settings

    monkeypatch.setattr(worker.celery_app, "enqueue_job", REAL_ENQUEUE)
    monkeypatch.setenv("MODELPRESS_BROKER_URL", redis_url)
    get_settings.cache_clear()
    worker.celery_app.get_celery.cache_clear()
    try:
        model = _upload_model(client)
        r = client.post("/v1/jobs", json={"model": model["id"], "steps": [{"type": "quantize"}]})
        assert r.status_code == 202, r.text
        queue = r.json()["queue"]
        conn = redis.Redis.from_url(redis_url)
        raw = conn.lpop(queue)
        assert raw is not None and r.json()["id"].encode() in raw
        conn.delete(queue, f"_kombu.binding.{queue}")
    finally:
        worker.celery_app.get_celery.cache_clear()


@pytest.mark.parametrize("db", ["pg_env", "sqlite_env"])
def test_timestamps_in_responses_are_utc(db: str, request: pytest.FixtureRequest) -> None:
    request.getfixturevalue(db)
    from api.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as c:
        model = _upload_model(c)
        assert model["created_at"].endswith("Z"), model
        r = c.post("/v1/jobs", json={"model": model["id"], "task": "generic",
                                     "steps": [{"type": "quantize", "mode": "dynamic"}]})
        assert r.status_code == 202, r.text
        job = c.get(f"/v1/jobs/{r.json()['id']}").json()
        stamps = [v for v in job["timestamps"].values() if v is not None]
        assert stamps and all(v.endswith("Z") for v in stamps), job["timestamps"]
        events = c.get(f"/v1/jobs/{job['id']}/events").json()["data"]
        assert events and all(e["ts"].endswith("Z") for e in events), events


def test_an_oversized_spec_is_413_counted_while_reading(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_MAX_JSON_BODY_BYTES", "2000")
    get_settings.cache_clear()
    model = _upload_model(client)
    big = json.dumps({"model": model["id"], "task": "generic", "pad": "x" * 5000}).encode()

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap must count the bytes themselves
        for i in range(0, len(big), 500):
            yield big[i:i + 500]

    for body in (big, chunks()):
        r = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.headers["content-type"].startswith("application/problem+json"), r.text
        assert r.json()["code"] == "body_too_large" and "2000" in r.json()["detail"]
    assert _jobs() == 0
    ok = client.post("/v1/jobs", json={"model": model["id"], "steps": [{"type": "quantize", "mode": "dynamic"}]})
    assert ok.status_code == 202, ok.text


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_a_non_json_spec_is_415(client: TestClient, ctype: str) -> None:
    model = _upload_model(client)
    r = client.post("/v1/jobs", content=json.dumps({"model": model["id"]}), headers={"Content-Type": ctype})
    assert r.status_code == 415 and r.headers["content-type"].startswith("application/problem+json"), r.text
    assert r.json()["code"] == "unsupported_media_type"
    assert _jobs() == 0


def test_a_job_has_a_name_and_metadata_the_list_filters_on(client: TestClient) -> None:
    model = _upload_model(client)["id"]
    spec = {"model": model, "steps": [{"type": "quantize"}]}
    first = client.post("/v1/jobs", json={**spec, "name": "nightly", "metadata": {"team": "vision", "run": "7"}})
    assert first.status_code == 202, first.text
    body = first.json()
    assert body["name"] == "nightly" and body["metadata"] == {"team": "vision", "run": "7"}
    assert "name" not in body["spec"] and "metadata" not in body["spec"]  # the spec is what the worker runs
    fetched = client.get(f"/v1/jobs/{body['id']}").json()
    assert fetched["name"] == "nightly" and fetched["metadata"] == {"team": "vision", "run": "7"}
    other = client.post("/v1/jobs", json={**spec, "metadata": {"team": "nlp"}}).json()
    plain = client.post("/v1/jobs", json=spec).json()
    assert plain["name"] is None and plain["metadata"] == {}

    def ids(**params: Any) -> list[str]:
        r = client.get("/v1/jobs", params=params)
        assert r.status_code == 200, r.text
        return [j["id"] for j in r.json()["data"]]

    assert ids(name="nightly") == [body["id"]]
    assert ids(meta="team=vision") == [body["id"]] and ids(meta="team=nlp") == [other["id"]]
    assert ids(meta=["team=vision", "run=7"]) == [body["id"]] and ids(meta=["team=vision", "run=8"]) == []
    assert set(ids()) == {body["id"], other["id"], plain["id"]}
    bad = client.get("/v1/jobs", params={"meta": "team"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "meta"


@pytest.mark.parametrize(
    ("labels", "field"),
    [
        ({"name": "x" * 256}, "name"),
        ({"name": ""}, "name"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"metadata": {f"k{i}": "v" for i in range(33)}}, "metadata"),
        ({"metadata": {"k": 3}}, "metadata.k"),
    ],
)
def test_bad_names_and_metadata_are_422_naming_the_field(
    client: TestClient, labels: dict[str, Any], field: str
) -> None:
    model = _upload_model(client)["id"]
    r = client.post("/v1/jobs", json={"model": model, **labels})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json"), r.text
    assert r.json()["errors"][0]["field"] == field
    assert _jobs() == 0


def test_a_search_is_one_queued_job_and_lists_its_trials(client: TestClient, enqueued: list[tuple[str, str]]) -> None:
    model = _upload_model(client)
    r = client.post("/v1/jobs", json={"model": model["id"], "search": {"objective": "size"}})
    assert r.status_code == 202, r.text
    search = r.json()
    assert search["spec"]["search"]["space"] == "auto" and search["spec"]["steps"] == []
    assert enqueued == [(search["id"], search["queue"])]
    trial = builders.insert_job(model["id"], "running")
    other = builders.insert_job(model["id"], "queued")
    with session_scope() as s:
        row = s.get(Job, trial)
        assert row is not None
        row.parent_id = search["id"]
    listed = client.get("/v1/jobs", params={"parent": search["id"]}).json()["data"]
    assert [j["id"] for j in listed] == [trial] and other not in {j["id"] for j in listed}
    missing = client.get("/v1/jobs", params={"parent": "job_nope"})
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


def test_cancel_of_a_running_search_cancels_its_trials(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.celery_app

    advanced: list[str] = []
    monkeypatch.setattr(worker.celery_app, "enqueue_advance", lambda job_id, queue: advanced.append(job_id))
    model_id = builders.insert_model()
    search = builders.insert_job(model_id, "running")
    queued, running, done = (builders.insert_job(model_id, st) for st in ("queued", "running", "succeeded"))
    with session_scope() as s:
        for jid in (queued, running, done):
            row = s.get(Job, jid)
            assert row is not None
            row.parent_id = search
        parent = s.get(Job, search)
        assert parent is not None
        parent.spec = {**parent.spec, "search": {"objective": "size"}}
    r = client.post(f"/v1/jobs/{search}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelling"
    with session_scope() as s:
        status = {jid: s.get(Job, jid).status for jid in (queued, running, done)}  # type: ignore[union-attr]
    assert status == {queued: "cancelled", running: "cancelling", done: "succeeded"}
    assert advanced == [search]  # a worker winds the search up once its trials end
