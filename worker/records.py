"""A job's record: claiming it, its heartbeat, its events, its inputs' local files, its artifacts and its end.

Every write to a job row or its artifact rows that the worker makes goes through here, each in a short
transaction of its own (no session is held open while a step runs). ``jobs``, ``search``, ``stage_cache``
and ``context`` import this module; it imports nothing from the worker.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from models import blobs
from models.db import retry_transient, session_scope
from models.ids import new_id
from models.settings import get_settings
from models.spec import JobSpec
from models.tables import (
    CANCELLED,
    CANCELLING,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    Artifact,
    Dataset,
    Job,
    JobEvent,
    Model,
    utcnow,
)
from storage import get_store
from storage.base import StorageFull, StoredBlob
from storage.staging import file_chunks

log = logging.getLogger(__name__)

ACTIVE = (RUNNING, CANCELLING)


@dataclass(frozen=True)
class Claim:
    """What a worker won when it claimed a job: the attempt number it runs under."""

    job_id: str
    attempt: int


@retry_transient()
def add_event(job_id: str, kind: str, message: str, **data: Any) -> None:
    """Append an event to a job's log in its own short transaction.

    The job row is locked first (as every other writer of a job's events does, by updating the row), so
    a job's event ids are handed out in commit order and a reader resuming after id N never skips one.
    """
    with session_scope() as s:
        s.execute(select(Job.id).where(Job.id == job_id).with_for_update())
        s.add(JobEvent(job_id=job_id, kind=kind, message=message, data=data))


@retry_transient()
def claim(job_id: str, worker: str, reclaim: bool = True) -> Claim | None:
    """Atomically move a queued job to running (attempt + 1); None if another worker has it or it ended.

    A job left ``running`` by a worker that died (its heartbeat older than the lease) is reclaimed (unless
    ``reclaim`` is False: a queued job or nothing, at once); past ``max_attempts`` it fails with ``worker_lost``.
    """
    settings = get_settings()
    now = utcnow()
    with session_scope() as s:
        won = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == QUEUED)
            .values(status=RUNNING, attempt=Job.attempt + 1, worker=worker, heartbeat_at=now,
                    started_at=now, phase="starting")
            .returning(Job.attempt)
        ).scalar_one_or_none()
    if won is not None:
        add_event(job_id, "status", f"running (attempt {won}) on {worker}", status=RUNNING, attempt=won)
        return Claim(job_id, won)
    return _reclaim_abandoned(job_id, worker, settings.job_lease_seconds) if reclaim else None


def _reclaim_abandoned(job_id: str, worker: str, lease_s: int) -> Claim | None:
    """Wait for an active job's heartbeat to go stale, then take it over (or give up if it finishes)."""
    deadline = time.monotonic() + lease_s * 2 + 5
    while time.monotonic() < deadline:
        with session_scope() as s:
            job = s.get(Job, job_id)
            if job is None or job.status in TERMINAL or job.status == QUEUED:
                return None
            stale_before = utcnow() - timedelta(seconds=lease_s)
            if job.attempt >= job.max_attempts and (job.heartbeat_at is None or job.heartbeat_at < stale_before):
                s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status.in_(ACTIVE), Job.attempt == job.attempt)
                    .values(status=FAILED, finished_at=utcnow(), phase="failed",
                            error={"code": "worker_lost", "step": None,
                                   "message": f"the worker died {job.attempt} times running this job"})
                )
                s.add(JobEvent(job_id=job_id, kind="status", message="failed: worker lost", data={"status": FAILED}))
                return None
            won = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status.in_(ACTIVE), Job.attempt == job.attempt,
                       or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before))
                .values(attempt=Job.attempt + 1, worker=worker, heartbeat_at=utcnow(), phase="restarting")
                .returning(Job.attempt)
            ).scalar_one_or_none()
        if won is not None:
            add_event(job_id, "status", f"worker lost; restarted (attempt {won}) on {worker}",
                      status=RUNNING, attempt=won)
            return Claim(job_id, won)
        time.sleep(min(2.0, lease_s / 4))
    return None


class Heartbeat(threading.Thread):
    """Refreshes jobs.heartbeat_at while the job runs, so a redelivered task knows this worker lives."""

    def __init__(self, claim: Claim, interval_s: float) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{claim.job_id}")
        self.claim = claim
        self.interval_s = interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                with session_scope() as s:
                    s.execute(
                        update(Job)
                        .where(Job.id == self.claim.job_id, Job.attempt == self.claim.attempt)
                        .values(heartbeat_at=utcnow())
                    )
            except Exception:  # a transient DB error must not kill the job; the next beat retries
                log.warning("heartbeat failed for %s", self.claim.job_id, exc_info=True)


@retry_transient()
def model_refs(spec: JobSpec, dest: Path | None = None) -> dict[str, tuple[Path, str, dict[str, Any]]]:
    """``{id: (local file, format, meta)}`` of every model the job reads."""
    ids = spec.model_ids()
    with session_scope() as s:
        rows = [(m.id, m.storage_key, m.format, dict(m.meta)) for m in s.scalars(select(Model).where(Model.id.in_(ids)))]
    return _local_files(rows, dest)


@retry_transient()
def dataset_refs(spec: JobSpec, dest: Path | None = None) -> dict[str, tuple[Path, str, dict[str, Any]]]:
    """``{id: (local file, format, meta)}`` of the job's datasets (train, eval, calibration, its tasks')."""
    ids = spec.dataset_ids()
    with session_scope() as s:
        rows = [(d.id, d.storage_key, d.format, dict(d.meta)) for d in s.scalars(select(Dataset).where(Dataset.id.in_(ids)))]
    return _local_files(rows, dest)


def _local_files(
    rows: list[tuple[str, str, str, dict[str, Any]]], dest: Path | None
) -> dict[str, tuple[Path, str, dict[str, Any]]]:
    """``{id: (local file, format, meta)}`` for ``(id, storage_key, format, meta)`` rows, after the DB session.

    The local store hands out its own files; a remote one downloads into ``dest`` (default ``$HOME/blobs``)."""
    store = get_store()
    folder = dest if dest is not None else get_settings().home / "blobs"
    return {rid: (store.local_copy(key, folder), fmt, meta) for rid, key, fmt, meta in rows}


_MEDIA_TYPES = {".onnx": "application/octet-stream", ".json": "application/json", ".html": "text/html",
                ".zip": "application/zip"}


@retry_transient()
def store_artifacts(claim: Claim, owner: str, files: dict[str, tuple[str, Path]],
                    meta: dict[str, Any] | None = None) -> list[str]:
    """Store files as the job's artifacts, all or nothing, keyed by (job, name): a re-run overwrites, never duplicates.

    Every blob is committed first (each under a write claim, held until the rows refer to it), then all
    the rows are written in one transaction. When any blob or the transaction fails (a full disk, an
    unreachable store, anything), no row of this attempt is written and the blobs already committed are
    marked orphans, so gc's sweep removes them unless another record refers to the same bytes."""
    store = get_store()
    stored: list[NewArtifact] = []
    with contextlib.ExitStack() as claims:
        try:
            for name, (kind, path) in files.items():
                try:
                    with store.stage(file_chunks(path)) as staged:
                        claims.enter_context(blobs.writing(staged.sha256))
                        media = _MEDIA_TYPES.get(path.suffix, "application/octet-stream")
                        stored.append(NewArtifact(name, kind, media, store.commit(staged), dict(meta or {})))
                except StorageFull as exc:
                    raise StorageFull(exc.errno, f"{exc.strerror}, storing artifact {name}") from exc
            return _index_artifacts(claim, owner, stored)
        except BaseException:
            _orphan_blobs([row.blob.key for row in stored])
            raise


def _orphan_blobs(keys: list[str]) -> None:
    """Mark what a failed store committed as orphans (best effort: the original error is the one to report)."""
    if not keys:
        return
    try:
        with session_scope() as s:
            blobs.mark_orphans(s, keys)
    except Exception:
        log.warning("could not mark %d blobs of a failed store as orphans", len(keys), exc_info=True)


@dataclass(frozen=True)
class NewArtifact:
    """One artifact row to write: its name, kind and media type, the blob it refers to, extra ``meta``."""

    name: str
    kind: str
    media_type: str
    blob: StoredBlob
    meta: dict[str, Any] = field(default_factory=dict)


def upsert_artifacts(s: Session, claim: Claim, owner: str, rows: list[NewArtifact]) -> list[str]:
    """In the caller's transaction: insert or update each (job, name) artifact row; a replaced blob becomes an orphan.

    The one writer of artifact rows (a job's own outputs, a search adopting its winner's, a job reusing an
    identical job's). The caller holds a write claim on every blob while this transaction commits."""
    ids: list[str] = []
    for row in rows:
        art = s.scalar(select(Artifact).where(Artifact.job_id == claim.job_id, Artifact.name == row.name))
        if art is None:
            art = Artifact(id=new_id("art"), owner=owner, job_id=claim.job_id, name=row.name)
            s.add(art)
        art.kind, art.media_type = row.kind, row.media_type
        if art.storage_key and art.storage_key != row.blob.key:
            blobs.mark_orphans(s, [art.storage_key])
        art.sha256, art.size_bytes, art.storage_key = row.blob.sha256, row.blob.size_bytes, row.blob.key
        art.meta = {"attempt": claim.attempt, **row.meta}
        art.created_at = utcnow()
        s.flush()
        ids.append(art.id)
    return ids


@retry_transient()
def _index_artifacts(claim: Claim, owner: str, rows: list[NewArtifact]) -> list[str]:
    with session_scope() as s:
        return upsert_artifacts(s, claim, owner, rows)


def reuse_artifacts(claim: Claim, owner: str, source_job: str, *, skip: frozenset[str] = frozenset(),
                    meta: dict[str, Any] | None = None) -> list[str] | None:
    """Rows for this job on the blobs of ``source_job``'s artifacts (those not named in ``skip``), under write
    claims so no sweep takes the blobs meanwhile; None when the source's artifacts went in the meantime."""
    with session_scope() as s:
        rows = [NewArtifact(a.name, a.kind, a.media_type, StoredBlob(a.storage_key, a.sha256, a.size_bytes),
                            dict(meta or {}))
                for a in s.scalars(select(Artifact).where(Artifact.job_id == source_job)) if a.name not in skip]
    keys = sorted({r.blob.key for r in rows})
    with contextlib.ExitStack() as stack:
        for key in keys:
            stack.enter_context(blobs.writing(key))
        with session_scope() as s:
            still = set(s.scalars(select(Artifact.storage_key).where(Artifact.job_id == source_job)))
            if not set(keys) <= still:
                return None
            return upsert_artifacts(s, claim, owner, rows)


@retry_transient()
def finish(claim: Claim, status: str, *, error: dict[str, Any] | None = None,
            result: dict[str, Any] | None = None, message: str = "") -> bool:
    """Move the job to a terminal state if this attempt still owns it; False if it lost ownership."""
    with session_scope() as s:
        values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "phase": status, "error": error}
        if status == SUCCEEDED:
            job = s.get(Job, claim.job_id)
            progress = dict(job.progress or {}) if job is not None else {}
            values["progress"] = {**progress, "step": progress.get("steps", 0), "percent": 100.0}
        if result is not None:
            values["result"] = result
        # docs/architecture.md §6 (job states): a cancelling job only ever becomes cancelled, even when its work finished meanwhile.
        sources = ACTIVE if status == CANCELLED else (RUNNING,)
        done = s.execute(
            update(Job)
            .where(Job.id == claim.job_id, Job.attempt == claim.attempt, Job.status.in_(sources))
            .values(**values)
            .returning(Job.id)
        ).scalar_one_or_none()
        if not done and status != CANCELLED:
            status, error, message = CANCELLED, None, "cancelled (the cancel arrived as the job finished)"
            done = s.execute(
                update(Job)
                .where(Job.id == claim.job_id, Job.attempt == claim.attempt, Job.status == CANCELLING)
                .values(status=CANCELLED, finished_at=utcnow(), phase=CANCELLED, error=None)
                .returning(Job.id)
            ).scalar_one_or_none()
        if done:
            data: dict[str, Any] = {"status": status}
            if error:
                data["error"] = error
            s.add(JobEvent(job_id=claim.job_id, kind="status", message=message or status, data=data))
    return done is not None


@retry_transient()
def spec_and_owner(job_id: str) -> tuple[JobSpec, str]:
    """The job's validated spec and its owner."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return JobSpec.model_validate(job.spec), job.owner


@retry_transient()
def job_status(job_id: str) -> str | None:
    """The job's status now (None when it is gone)."""
    with session_scope() as s:
        return s.scalar(select(Job.status).where(Job.id == job_id))
