"""worker.gc: retention, deferred deletes, orphan blobs, staged uploads and work folders of killed processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from models import blobs
from models.db import session_scope
from models.settings import get_settings
from models.tables import Artifact, BlobOrphan, Job, utcnow
from storage import get_store
from storage.staging import stage
from tests.api import builders
from worker.gc import clean_leftovers, clean_work_folders, run_gc

OLD = time.time() - 3600


def _age(path: Path) -> None:
    os.utime(path, (OLD, OLD))


def _finished(job_id: str, days_ago: float, **values: object) -> None:
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == job_id)
                  .values(finished_at=utcnow() - timedelta(days=days_ago), **values))


def _blob_exists(data: bytes) -> bool:
    import hashlib

    return get_store().exists(hashlib.sha256(data).hexdigest())


def test_killed_upload_is_removed_but_a_live_one_is_not(pg_env: str) -> None:
    tmp = get_store().staging_dir
    tmp.mkdir(parents=True, exist_ok=True)
    dead = tmp / "up-killed"
    dead.write_bytes(b"x" * 5000)  # no process holds its lock: the uploader was killed
    _age(dead)
    fresh = tmp / "up-fresh"
    fresh.write_bytes(b"y")  # within the grace period
    with stage([b"z" * 100], tmp) as live:  # an upload in progress holds its flock
        _age(live.path)
        report = clean_leftovers()
        assert live.path.exists()
    assert not dead.exists() and fresh.exists()
    assert report.staged_files == 1 and report.staged_bytes == 5000


def test_work_folders_of_attempts_that_no_longer_run(pg_env: str) -> None:
    work = get_settings().home / "work"
    model = builders.insert_model()
    done = builders.insert_job(model, status="succeeded")
    running = builders.insert_job(model, status="running")
    queued = builders.insert_job(model, status="queued")
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == running).values(attempt=2))
    folders = [work / done / "attempt-1", work / running / "attempt-1", work / running / "attempt-2",
               work / queued / "attempt-1", work / "job_gone" / "attempt-3"]
    for f in folders:
        f.mkdir(parents=True)
        (f / "weights.bin").write_bytes(b"w" * 1000)
        _age(f)
    n, freed = clean_work_folders(work, grace_s=60)
    assert (n, freed) == (4, 4000)
    assert sorted(p.relative_to(work).as_posix() for p in work.glob("*/*")) == [f"{running}/attempt-2"]
    assert not (work / done).exists() and not (work / "job_gone").exists()


def test_retention_and_deferred_deletes(pg_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPRESS_RETAIN_FAILED_JOBS_DAYS", "30")
    monkeypatch.setenv("MODELPRESS_RETAIN_ARTIFACTS_DAYS", "90")
    get_settings.cache_clear()
    model = builders.insert_model()
    old_failed = builders.insert_job(model, status="failed")
    builders.insert_artifact(old_failed, b"old failed output")
    new_failed = builders.insert_job(model, status="failed")
    builders.insert_artifact(new_failed, b"new failed output")
    old_ok = builders.insert_job(model, status="succeeded")
    builders.insert_artifact(old_ok, b"old good output")
    deferred = builders.insert_job(model, status="cancelled")
    builders.insert_artifact(deferred, b"cancelled output")
    _finished(old_failed, 40)
    _finished(new_failed, 1)
    _finished(old_ok, 100)
    _finished(deferred, 0, delete_requested=True)
    report = run_gc()
    with session_scope() as s:
        jobs = set(s.scalars(select(Job.id)))
        arts = set(s.scalars(select(Artifact.job_id)))
    assert jobs == {new_failed, old_ok}  # the old succeeded job stays, without its artifacts
    assert arts == {new_failed}
    assert (report.jobs, report.artifacts, report.blobs) == (2, 3, 3)
    assert report.blob_bytes == len(b"old failed output") + len(b"old good output") + len(b"cancelled output")
    assert _blob_exists(b"new failed output") and not _blob_exists(b"old good output")
    assert run_gc().records == 0  # nothing left to do


def test_orphans_a_crash_left_are_swept(pg_env: str) -> None:
    store = get_store()
    kept = store.put([b"still referenced"])
    gone = store.put([b"nobody refers to me"])
    job = builders.insert_job(builders.insert_model(), status="succeeded")
    builders.insert_artifact(job, b"still referenced")
    with session_scope() as s:  # as a deletion that crashed after its commit would leave them
        blobs.mark_orphans(s, [kept.key, gone.key])
    report = run_gc()
    assert (report.blobs, report.blob_bytes) == (1, len(b"nobody refers to me"))
    assert store.exists(kept.key) and not store.exists(gone.key)
    with session_scope() as s:
        assert s.scalars(select(BlobOrphan)).all() == []


def test_cli_prints_what_it_freed(pg_env: str) -> None:
    store = get_store()
    gone = store.put([b"q" * 321])
    with session_scope() as s:
        blobs.mark_orphans(s, [gone.key])
    leftover = store.staging_dir / "up-dead"
    leftover.write_bytes(b"d" * 100)
    _age(leftover)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-m", "client.cli", "gc", "--json"], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    freed = json.loads(out.stdout)
    assert freed["blobs"] == 1 and freed["blob_bytes"] == 321
    assert freed["staged_files"] == 1 and freed["staged_bytes"] == 100 and freed["freed_bytes"] == 421
    text = subprocess.run([sys.executable, "-m", "client.cli", "gc"], env=env, capture_output=True, text=True,
                          timeout=120, check=True).stdout
    assert text.startswith("freed 0 bytes: 0 records") and "0 blobs" in text


def test_deferred_delete_finishes_once_the_job_stopped(pg_env: str) -> None:
    from worker.gc import finish_deferred_deletes

    job = builders.insert_job(builders.insert_model(), status="cancelling")
    builders.insert_artifact(job, b"partial output")
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == job).values(delete_requested=True))
    assert finish_deferred_deletes().jobs == 0  # still stopping: left alone
    builders.set_status(job, "cancelled")
    report = finish_deferred_deletes()
    assert (report.jobs, report.artifacts, report.blobs) == (1, 1, 1) and not _blob_exists(b"partial output")
    with session_scope() as s:
        assert s.get(Job, job) is None
