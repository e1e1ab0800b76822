"""Run one job: claim it atomically, run the pipeline with a DB-backed context, record the outcome.

The Celery task is a thin shell around :func:`execute`. Everything here keeps DB sessions short:
no session is held open while a step runs.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select, update

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
from storage import StorageUnavailable, get_store
from storage.base import StorageFull, StoredBlob, is_full
from storage.staging import file_chunks

if TYPE_CHECKING:
    from worker.context import DBContext, LocalContext
    from worker.pipeline import PipelineResult

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
def claim(job_id: str, worker: str) -> Claim | None:
    """Atomically move a queued job to running (attempt + 1); None if another worker has it or it ended.

    A job left ``running`` by a worker that died (its heartbeat older than the lease) is reclaimed;
    past ``max_attempts`` it fails with ``worker_lost``.
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
    return _reclaim_abandoned(job_id, worker, settings.job_lease_seconds)


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


class _Heartbeat(threading.Thread):
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


def _make_context(claim: Claim, spec: JobSpec, workdir: Path) -> DBContext:
    from worker.context import DBContext

    # A remote store's inputs are linked into the attempt's folder (removed with it); the local store's are its own files.
    inputs = workdir / "inputs"
    return DBContext(claim, workdir, spec, models=_model_refs(spec, inputs), datasets=_dataset_refs(spec, inputs))


@retry_transient()
def _model_refs(spec: JobSpec, dest: Path | None = None) -> dict[str, tuple[Path, str, dict[str, Any]]]:
    ids = spec.model_ids()
    with session_scope() as s:
        rows = [(m.id, m.storage_key, m.format, dict(m.meta)) for m in s.scalars(select(Model).where(Model.id.in_(ids)))]
    return _local_files(rows, dest)


@retry_transient()
def _dataset_refs(spec: JobSpec, dest: Path | None = None) -> dict[str, tuple[Path, str, dict[str, Any]]]:
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
def _store_artifacts(claim: Claim, owner: str, files: dict[str, tuple[str, Path]]) -> list[str]:
    """Store files as the job's artifacts, all or nothing, keyed by (job, name): a re-run overwrites, never duplicates.

    Every blob is committed first (each under a write claim, held until the rows refer to it), then all
    the rows are written in one transaction. When any blob or the transaction fails (a full disk, an
    unreachable store, anything), no row of this attempt is written and the blobs already committed are
    marked orphans, so gc's sweep removes them unless another record refers to the same bytes."""
    store = get_store()
    stored: list[tuple[str, str, Path, StoredBlob]] = []
    with contextlib.ExitStack() as claims:
        try:
            for name, (kind, path) in files.items():
                try:
                    with store.stage(file_chunks(path)) as staged:
                        claims.enter_context(blobs.writing(staged.sha256))
                        stored.append((name, kind, path, store.commit(staged)))
                except StorageFull as exc:
                    raise StorageFull(exc.errno, f"{exc.strerror}, storing artifact {name}") from exc
            return _index_artifacts(claim, owner, stored)
        except BaseException:
            _orphan_blobs([blob.key for *_, blob in stored])
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


@retry_transient()
def _index_artifacts(claim: Claim, owner: str, stored: list[tuple[str, str, Path, StoredBlob]]) -> list[str]:
    """Insert or update every (job, name) artifact row in one transaction; a replaced blob becomes an orphan."""
    ids: list[str] = []
    with session_scope() as s:
        for name, kind, path, blob in stored:
            art = s.scalar(select(Artifact).where(Artifact.job_id == claim.job_id, Artifact.name == name))
            if art is None:
                art = Artifact(id=new_id("art"), owner=owner, job_id=claim.job_id, name=name)
                s.add(art)
            art.kind = kind
            art.media_type = _MEDIA_TYPES.get(path.suffix, "application/octet-stream")
            if art.storage_key and art.storage_key != blob.key:
                blobs.mark_orphans(s, [art.storage_key])
            art.sha256, art.size_bytes, art.storage_key = blob.sha256, blob.size_bytes, blob.key
            art.meta = {"attempt": claim.attempt}
            art.created_at = utcnow()
            s.flush()
            ids.append(art.id)
    return ids


@retry_transient()
def _finish(claim: Claim, status: str, *, error: dict[str, Any] | None = None,
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
        # DESIGN 5: a cancelling job only ever becomes cancelled, even when its work finished meanwhile.
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


def _record_success(
    claim: Claim, owner: str, out: PipelineResult, spec: JobSpec, workdir: Path, ctx: LocalContext | None = None
) -> None:
    import json

    from worker import deliverables

    report_path = workdir / "report.json"
    report_path.write_text(json.dumps(out.report, indent=2, default=str))
    files = deliverables.prepare(
        out.output_path, spec, job_id=claim.job_id, workdir=workdir,
        model_ref=ctx.models.get(spec.model) if ctx is not None else None,
        classes=ctx.classes() if ctx is not None else None,
    )
    files["report.json"] = ("report", report_path)
    # the output's own data files travel inside model.zip (deliverables.prepare) when there is one
    files.update({name: ("extra", path) for name, path in out.files.items()
                  if not (name == "model.onnx.data" and "model.zip" in files)})
    artifact_ids = _store_artifacts(claim, owner, files)
    result = {"artifact_ids": artifact_ids, "report": out.report, "warnings": out.report.get("warnings") or []}
    budget = out.report.get("budget") or {}
    if budget.get("met") is False:
        from models.report_view import accuracy_drop_text

        change = accuracy_drop_text(budget.get("accuracy_drop"), spec.evaluate.max_accuracy_drop,
                                    (out.report.get("output") or {}).get("num_samples"))
        what = budget["reason"] if "perplexity_increase" in budget else f"accuracy {change}"  # causal LMs
        error = {"code": "accuracy_budget_exceeded", "step": "evaluate",
                 "message": f"{what}; the model is still downloadable"}
        _finish(claim, FAILED, error=error, result=result, message="failed: accuracy budget exceeded")
    else:
        _finish(claim, SUCCEEDED, result=result, message="succeeded")


def execute(job_id: str) -> str | None:
    """Claim and run ``job_id``; returns the terminal status this worker set (None if it did not run it)."""
    me = f"{socket.gethostname()}:{threading.get_native_id()}"
    won = claim(job_id, me)
    if won is None:
        log.info("job %s not claimed (taken, finished or cancelled)", job_id)
        _notify_parent(job_id)  # a trial cancelled while queued still advances its search
        return None
    spec, owner = _spec_and_owner(job_id)
    if spec.search is not None:
        from worker.search import start

        return start(won, spec, owner)
    try:
        return _execute_claimed(won, spec, owner)
    finally:
        _notify_parent(job_id)


def _notify_parent(job_id: str) -> None:
    """A search's trial that ended queues the search's ``advance`` (which is idempotent)."""
    with session_scope() as s:
        row = s.execute(select(Job.parent_id, Job.status).where(Job.id == job_id)).one_or_none()
        parent = None if row is None or row.parent_id is None else s.get(Job, row.parent_id)
        target = None if parent is None or row is None or row.status not in TERMINAL else (parent.id, parent.queue)
    if target is not None:
        from worker.celery_app import enqueue_advance

        try:
            enqueue_advance(*target)
        except Exception:
            log.exception("advance of search %s not queued after trial %s", target[0], job_id)


def _execute_claimed(won: Claim, spec: JobSpec, owner: str) -> str | None:
    """Run a claimed (non-search) job to its end; the terminal status."""
    from worker.passes.base import JobCancelled
    from worker.pipeline import StepError, run

    settings = get_settings()
    job_id = won.job_id
    workdir = settings.home / "work" / job_id / f"attempt-{won.attempt}"
    workdir.mkdir(parents=True, exist_ok=True)
    beat = _Heartbeat(won, max(1.0, settings.job_lease_seconds / 4))
    beat.start()
    phase = "setup"  # which part touched the blob store when it failed: fetching inputs or storing outputs
    try:
        from worker import stage_cache

        status: str = SUCCEEDED
        if not (spec.cache and stage_cache.reuse_finished(won, owner, spec, workdir)):
            ctx = _make_context(won, spec, workdir)
            phase = "pipeline"
            cache = stage_cache.StageCache.for_job(owner, job_id, spec, ctx.device) if spec.cache else None
            out = run(spec, ctx, cache)
            phase = "store"
            _record_success(won, owner, out, spec, workdir, ctx)
            if cache is not None:
                cache.remember()
    except JobCancelled:
        _finish(won, CANCELLED, message="cancelled")
        status = CANCELLED
    except StepError as e:
        _finish(won, FAILED, error={"code": e.code, "message": e.message, "step": e.step},
                message=f"failed in {e.step}: {e.message}")
        status = FAILED
    except Exception as e:
        from celery.exceptions import SoftTimeLimitExceeded

        if isinstance(e, SoftTimeLimitExceeded):
            error = {"code": "time_limit", "step": None,
                     "message": f"the job ran past the soft time limit of {settings.task_soft_time_limit} s"}
        elif is_full(e):
            # No space for the inputs, the work files or the outputs: no artifact of this attempt was recorded.
            log.error("job %s: no space left (%s): %s", job_id, phase, e)
            error = {"code": "storage_full", "step": phase, "message": str(e)}
        elif isinstance(e, StorageUnavailable):
            # Reading inputs or storing outputs failed after the store's own retries: say so, not "internal".
            log.warning("job %s: blob store unavailable: %s", job_id, e)
            error = {"code": "storage_unavailable", "step": phase, "message": str(e)}
        else:
            log.exception("job %s failed outside a step", job_id)
            error = {"code": "internal_error", "step": "store" if phase == "store" else "setup",
                     "message": f"{type(e).__name__}: {e}"}
        _finish(won, FAILED, error=error, message=f"failed: {error['message']}")
        status = FAILED
    finally:
        beat.stopped.set()
        shutil.rmtree(workdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            workdir.parent.rmdir()  # the job's folder, once no other attempt's workdir is in it
    final = _status(job_id)
    return final if final in TERMINAL else status


@retry_transient()
def _spec_and_owner(job_id: str) -> tuple[JobSpec, str]:
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return JobSpec.model_validate(job.spec), job.owner


@retry_transient()
def _status(job_id: str) -> str | None:
    with session_scope() as s:
        return s.scalar(select(Job.status).where(Job.id == job_id))
