"""Claiming is atomic, a dead worker's job is reclaimed once its lease expires, terminal states stick."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from models import blobs
from models.db import session_scope
from models.ids import new_id
from models.tables import Artifact, BlobOrphan, Job, JobEvent, Model, utcnow
from tests.e2e.pg_server import PgServer, pg_server
from worker import jobs, records


def _job(status: str = "queued", attempt: int = 0, max_attempts: int = 3) -> str:
    with session_scope() as s:
        m = Model(id=new_id("mdl"), owner="local", name="m", format="onnx", sha256="0" * 64, size_bytes=1,
                  storage_key="0" * 64, meta={})
        s.add(m)
        s.flush()
        j = Job(id=new_id("job"), owner="local", status=status, spec={"model": m.id}, model_id=m.id,
                queue="cpu", attempt=attempt, max_attempts=max_attempts, progress={})
        s.add(j)
        return j.id


def _get(job_id: str) -> Job:
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def test_only_one_of_many_racing_workers_claims(pg_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "_reclaim_abandoned", lambda *a: None)
    job_id = _job()
    wins: list[records.Claim] = []
    threads = [threading.Thread(target=lambda i=i: wins.append(c) if (c := records.claim(job_id, f"w{i}")) else None)
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and wins[0].attempt == 1
    assert _get(job_id).status == "running"


@pytest.fixture(params=["pg_env", "sqlite_env"])
def any_db(request: pytest.FixtureRequest) -> str:
    """Each test using it runs on PostgreSQL and on the embedded SQLite database."""
    return str(request.getfixturevalue(request.param))


def test_abandoned_job_is_reclaimed_after_the_lease(any_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = _job(status="running", attempt=1)
    with session_scope() as s:
        s.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=120)  # type: ignore[union-attr]
    won = records.claim(job_id, "w2")
    assert won == records.Claim(job_id, 2)
    with session_scope() as s:
        messages = s.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id)).all()
    assert any("restarted (attempt 2)" in m for m in messages)


def test_job_past_its_attempts_fails_with_worker_lost(pg_env: str) -> None:
    job_id = _job(status="running", attempt=3, max_attempts=3)
    with session_scope() as s:
        s.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=120)  # type: ignore[union-attr]
    assert records.claim(job_id, "w4") is None
    job = _get(job_id)
    assert job.status == "failed" and job.error is not None and job.error["code"] == "worker_lost"


def test_finish_is_refused_once_terminal_or_owned_by_a_later_attempt(pg_env: str) -> None:
    job_id = _job(status="running", attempt=2)
    assert not records.finish(records.Claim(job_id, 1), "succeeded")  # a stale attempt cannot finish it
    assert records.finish(records.Claim(job_id, 2), "cancelled")
    assert not records.finish(records.Claim(job_id, 2), "succeeded")  # terminal states never change
    assert _get(job_id).status == "cancelled"


def test_cancelled_queued_job_is_not_claimed(pg_env: str) -> None:
    job_id = _job(status="cancelled")
    assert records.claim(job_id, "w") is None
    assert _get(job_id).attempt == 0


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_a_cancel_during_the_last_stage_ends_cancelled(pg_env: str, outcome: str) -> None:
    # docs/architecture.md §6: running -> cancelling -> cancelled. A worker finishing after the user's cancel must not
    # move a cancelling job to succeeded (or failed).
    job_id = _job(status="cancelling", attempt=1)
    assert records.finish(records.Claim(job_id, 1), outcome, error={"code": "x", "message": "m", "step": None})
    job = _get(job_id)
    assert job.status == "cancelled" and job.finished_at is not None and job.error is None
    assert not records.finish(records.Claim(job_id, 1), outcome)  # and it stays cancelled


def test_execute_leaves_no_work_folder_behind(pg_env: str) -> None:
    """A job whose input cannot be loaded fails in setup, and its work folder is removed with its parent."""
    from models.settings import get_settings

    job_id = _job()
    assert jobs.execute(job_id) == "failed"
    job = _get(job_id)
    assert job.error is not None and job.error["step"]
    assert not (get_settings().home / "work" / job_id).exists()


def test_a_slower_output_is_a_warning_in_the_job_result(pg_env: str, tmp_path: Path) -> None:
    """A real pipeline run that makes a CNN slower, recorded as a job: result.warnings says so, the API serves it."""
    from api.services.jobs import job_out
    from models.spec import JobSpec
    from tests.worker.test_pipeline import run_cnn_dynamic_int8

    out = run_cnn_dynamic_int8(tmp_path)
    job_id = _job(status="running", attempt=1)
    spec = JobSpec.model_validate({"model": "mdl_x", "task": "image-classification", "data": {"eval": "ds_e"},
                                   "steps": [{"type": "quantize", "mode": "dynamic"}]})
    jobs._record_success(records.Claim(job_id, 1), "local", out, spec, tmp_path)
    job = _get(job_id)
    assert job.status == "succeeded" and job.result is not None
    codes = [w["code"] for w in job.result["warnings"]]
    assert "slower_than_input" in codes
    with session_scope() as s:
        served = job_out(s, s.get(Job, job_id))
    assert served.result is not None and "slower than the input model" in served.result.warnings[0]["message"]


def test_timestamps_read_back_aware_utc_on_every_database(any_db: str) -> None:
    job_id = _job(status="running", attempt=1)
    job = _get(job_id)
    assert job.created_at.tzinfo is not None and job.created_at.utcoffset() == timedelta(0)


def test_inputs_that_keep_failing_to_download_fail_the_job_as_storage_unavailable(
    pg_env: str, s3_env: str, s3_server: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 breaks off every download of the model: retried, then the job fails in setup saying so; nothing cached."""
    from models.settings import get_settings
    from storage import backends, get_store
    from storage.s3 import S3BlobStore
    from tests.storage.faults import proxy
    from tests.storage.seaweed import Weed

    assert isinstance(s3_server, Weed)
    with proxy(s3_server.endpoint) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
        monkeypatch.setattr(backends, "_STORES", {})
        store = get_store()
        assert isinstance(store, S3BlobStore)
        blob = store.put([bytes(range(256)) * 4096])  # 1 MiB
        with session_scope() as s:
            m = Model(id=new_id("mdl"), owner="local", name="m", format="onnx", sha256=blob.sha256,
                      size_bytes=blob.size_bytes, storage_key=blob.key, meta={})
            s.add(m)
            s.flush()
            j = Job(id=new_id("job"), owner="local", status="queued", spec={"model": m.id}, model_id=m.id,
                    queue="cpu", attempt=0, max_attempts=3, progress={})
            s.add(j)
            job_id = j.id
        store.retry_delay_s = 0.05
        p.after_bytes, p.break_responses = 64 * 1024, 100
        store.client.close()  # new connections from here on: each one breaks off
        assert jobs.execute(job_id) == "failed"
        assert p.broken == 3  # three attempts
    job = _get(job_id)
    assert job.error is not None and job.error["code"] == "storage_unavailable" and job.error["step"] == "setup"
    assert "could not be downloaded" in job.error["message"] and "3 attempts" in job.error["message"]
    assert store.cache.get(blob.key) is None and not (get_settings().home / "work" / job_id).exists()


def test_a_missed_perplexity_budget_fails_the_job_saying_which_bound(pg_env: str, tmp_path: Path) -> None:
    from models.spec import JobSpec
    from worker.stages import PipelineResult, build_report

    spec = JobSpec.model_validate({"model": "mdl_x", "task": "text-generation", "data": {"eval": "ds_e"},
                                   "evaluate": {"max_perplexity_increase": 0.05}})
    side = {"size_bytes": 10, "params": 5, "latency_ms": {"median": 1.0}, "accuracy": None}
    report = build_report(spec, {**side, "perplexity": 10.0}, {**side, "perplexity": 11.0}, [], "cpu")
    model = tmp_path / "model.onnx"
    from tests.api import builders

    model.write_bytes(builders.onnx_bytes())  # a real model: deliverables stamp its metadata before storing
    job_id = _job(status="running", attempt=1)
    jobs._record_success(records.Claim(job_id, 1), "local", PipelineResult(model, report), spec, tmp_path)
    job = _get(job_id)
    assert job.status == "failed" and job.error is not None and job.error["code"] == "accuracy_budget_exceeded"
    assert "perplexity rose 10.00% (10 -> 11; allowed 5.00%)" in job.error["message"]
    assert "still downloadable" in job.error["message"] and job.result is not None and job.result["artifact_ids"]


@pytest.fixture
def on_private_pg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PgServer]:
    """MODELPRESS_* on a migrated PostgreSQL of this test's own, which the test may stop and start."""
    from migrations import upgrade
    from models.db import reset_engines
    from tests.conftest import _apply_env

    with pg_server() as server:
        upgrade(server.url)
        _apply_env(monkeypatch, tmp_path / "home", database_url=server.url)
        yield server
        reset_engines()


def test_the_final_status_write_and_events_wait_out_a_postgres_restart(on_private_pg: PgServer) -> None:
    """PostgreSQL stops while the job runs (every pooled connection dies) and is back 1.5 s later."""
    job_id = _job()
    won = records.claim(job_id, "w1")
    assert won is not None
    on_private_pg.stop()
    threading.Timer(1.5, on_private_pg.start).start()
    records.add_event(job_id, "log", "written once the database is back")
    assert records.finish(won, "succeeded", result={"artifact_ids": []}, message="succeeded")
    job = _get(job_id)
    assert job.status == "succeeded" and job.attempt == 1
    with session_scope() as s:
        events = [(e.kind, e.data.get("status")) for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                                                                     .order_by(JobEvent.id))]
    assert events == [("status", "running"), ("log", None), ("status", "succeeded")]
    assert not records.finish(won, "succeeded")  # rerunning the write (a lost acknowledgement) changes nothing


def _job_with_stored_input() -> str:
    """A queued job whose input model is a real blob of the configured store."""
    from storage import get_store

    blob = get_store().put([b"the input model's bytes"])
    with session_scope() as s:
        m = Model(id=new_id("mdl"), owner="local", name="m", format="onnx", sha256=blob.sha256,
                  size_bytes=blob.size_bytes, storage_key=blob.key, meta={})
        s.add(m)
        s.flush()
        j = Job(id=new_id("job"), owner="local", status="queued", spec={"model": m.id}, model_id=m.id,
                queue="cpu", attempt=0, max_attempts=3, progress={})
        s.add(j)
        return j.id


def _pipeline_gives(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, report: dict[str, object]) -> Path:
    """The pipeline (not what is under test here) hands back a real tiny ONNX model and ``report``."""
    from tests.api import builders
    from worker import pipeline

    out = tmp_path / "out.onnx"
    out.write_bytes(builders.onnx_bytes(in_features=4, out_features=3))
    monkeypatch.setattr(pipeline, "run", lambda spec, ctx, cache=None: pipeline.PipelineResult(out, dict(report)))
    return out


def _artifact_rows(job_id: str) -> list[Artifact]:
    with session_scope() as s:
        return list(s.scalars(select(Artifact).where(Artifact.job_id == job_id)))


def test_artifacts_are_stored_all_or_nothing_when_the_disk_fills(
    pg_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.onnx fits on a 1 MiB store, report.json (2 MiB) does not: no artifact row, the job fails in store
    with storage_full, gc's sweep removes model.onnx's blob, and a later attempt stores its artifacts."""
    import hashlib

    from models.settings import get_settings
    from storage import get_store
    from tests.factories_disk import small_filesystem

    with small_filesystem(get_settings().blob_dir, 1024 * 1024):
        store = get_store()
        job_id = _job_with_stored_input()
        out = _pipeline_gives(monkeypatch, tmp_path, {"warnings": [], "notes": "x" * (2 * 1024 * 1024)})
        assert jobs.execute(job_id) == "failed"
        job = _get(job_id)
        assert job.error is not None and job.error["code"] == "storage_full" and job.error["step"] == "store"
        assert "no space left" in job.error["message"] and "storing artifact report.json" in job.error["message"]
        assert _artifact_rows(job_id) == []
        model_key = hashlib.sha256(out.read_bytes()).hexdigest()  # the stamped model, stored first
        assert store.exists(model_key)
        with session_scope() as s:
            assert list(s.scalars(select(BlobOrphan.key))) == [model_key]
        swept = blobs.sweep_orphans(store)
        assert swept.blobs == 1 and not store.exists(model_key)
        assert store.exists(_get_model_key(job_id))  # the input is untouched
        assert list((get_settings().blob_dir / "tmp").iterdir()) == []
        # Another attempt, with room for its files, stores them all.
        small = tmp_path / "report.json"
        small.write_text("{}")
        ids = records.store_artifacts(records.Claim(job_id, 2), "local",
                                    {"model.onnx": ("model", out), "report.json": ("report", small)})
        assert sorted(a.id for a in _artifact_rows(job_id)) == sorted(ids) and len(ids) == 2


def _get_model_key(job_id: str) -> str:
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.model_id is not None
        model = s.get(Model, job.model_id)
        assert model is not None
        return model.storage_key


def test_any_failure_storing_an_artifact_leaves_no_artifact_rows(
    pg_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store becomes unreachable at the 2nd artifact: no row, storage_unavailable in store, one orphan."""
    from storage import StorageUnavailable, get_store

    store = get_store()
    job_id = _job_with_stored_input()
    _pipeline_gives(monkeypatch, tmp_path, {"warnings": []})
    commit, calls = store.commit, []

    def flaky(staged: object) -> object:
        calls.append(staged)
        if len(calls) == 2:
            raise StorageUnavailable("storing blob: the store stopped answering after 3 attempts")
        return commit(staged)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "commit", flaky)
    assert jobs.execute(job_id) == "failed"
    job = _get(job_id)
    assert job.error is not None and job.error["code"] == "storage_unavailable" and job.error["step"] == "store"
    assert _artifact_rows(job_id) == [] and len(calls) == 2
    with session_scope() as s:
        orphans = list(s.scalars(select(BlobOrphan.key)))
    assert len(orphans) == 1 and blobs.sweep_orphans(store).blobs == 1 and not store.exists(orphans[0])
