"""Jobs: create (commit, then enqueue), read, list, cancel. Status changes are guarded UPDATEs."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import ProblemError, field_error, not_found
from api.services import quotas
from api.services.artifacts import artifact_out
from api.services.lookup import get_owned
from api.services.memory_check import check_memory
from api.services.pagination import paginate
from api.services.spec_checks import check_references
from models.db import get_engine, session_scope
from models.ids import new_id
from models.queues import queued_message
from models.schemas import JobError, JobLabels, JobOut, JobResult, Page, Progress, Timestamps
from models.settings import Settings
from models.spec import JobSpec
from models.tables import (
    CANCELLED,
    CANCELLING,
    QUEUED,
    RUNNING,
    STATUSES,
    TERMINAL,
    Artifact,
    Job,
    JobEvent,
    utcnow,
)

log = logging.getLogger("modelpress.api.jobs")
MAX_IDEMPOTENCY_KEY = 255


def _spec_of(job: Job) -> JobSpec:
    try:
        return JobSpec.model_validate(job.spec)
    except ValidationError:
        # A spec stored by an older version still reads back as it was submitted.
        return JobSpec.model_construct(**job.spec)


def _warnings(stored: dict[str, Any], report: Any) -> list[dict[str, Any]]:
    """A result's regression warnings (older results keep them only in the report, or not at all)."""
    found = stored.get("warnings")
    if found is None and isinstance(report, dict):
        found = report.get("warnings")
    return [w for w in found or [] if isinstance(w, dict)]


def job_out(session: Session | None, job: Job) -> JobOut:
    """The response body of a job, with its artifacts from the index (None: a job just made, it has none)."""
    artifacts = [] if session is None else list(
        session.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.name)))
    result: JobResult | None = None
    stored: dict[str, Any] = job.result or {}
    if stored or artifacts:
        report = stored.get("report") if "report" in stored else {k: v for k, v in stored.items() if k != "artifacts"}
        result = JobResult(artifacts=[artifact_out(a) for a in artifacts], report=report or {},
                           warnings=_warnings(stored, report), cached_from=stored.get("cached_from"),
                           best=stored.get("best"))
    error: JobError | None = None
    if job.error:
        error = JobError(
            code=str(job.error.get("code", "error")),
            message=str(job.error.get("message", "")),
            step=job.error.get("step"),
        )
    return JobOut(
        id=job.id,
        name=job.name,
        metadata=job.metadata_ or {},
        status=job.status,
        phase=job.phase,
        progress=Progress.model_validate(job.progress or {}),
        attempt=job.attempt,
        queue=job.queue,
        error=error,
        result=result,
        spec=_spec_of(job),
        timestamps=Timestamps(
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        ),
    )


_PROGRESS_DEFAULTS: dict[str, Any] = Progress().model_dump()
_ARTIFACT_COLUMNS = ("id", "job_id", "name", "kind", "media_type", "sha256", "size_bytes", "meta", "created_at")


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).isoformat().replace("+00:00", "Z")


class _ReadCache:
    """A per-process micro-cache of job bodies: many clients polling one job cost one query per TTL.

    A job dropped from it (cancelled or deleted through this process) is not cached again by a read that
    began before the drop, so a read racing a DELETE cannot put the deleted job back for a minute."""

    TERMINAL_TTL_S = 60.0
    MAX_ENTRIES = 10_000

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, str, bytes]] = {}
        self._dropped: dict[str, float] = {}
        self._lock = threading.Lock()

    def get(self, owner: str, job_id: str) -> bytes | None:
        entry = self._entries.get(job_id)
        if entry is None or entry[0] < time.monotonic() or entry[1] != owner:
            return None
        return entry[2]

    def put(self, owner: str, job_id: str, body: bytes, ttl_s: float, read_at: float | None = None) -> None:
        """Cache ``body`` for ``ttl_s``, unless the job was dropped after ``read_at`` (when the read began)."""
        with self._lock:
            if read_at is not None and self._dropped.get(job_id, float("-inf")) >= read_at:
                return
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            self._entries[job_id] = (time.monotonic() + ttl_s, owner, body)

    def drop(self, job_id: str) -> None:
        with self._lock:
            self._entries.pop(job_id, None)
            if len(self._dropped) >= self.MAX_ENTRIES:
                self._dropped.clear()
            self._dropped[job_id] = time.monotonic()


READ_CACHE = _ReadCache()


def read_job_json(owner: str, job_id: str, cache_s: float = 0.0) -> bytes:
    """``GET /v1/jobs/{id}``'s body, from the micro-cache when younger than ``cache_s`` seconds.

    A job whose deletion was requested is never cached: the worker's gc removes it once it has stopped."""
    if cache_s > 0 and (body := READ_CACHE.get(owner, job_id)) is not None:
        return body
    read_at = time.monotonic()
    body, status, deleting = _query_job_json(owner, job_id)
    if cache_s > 0 and not deleting:
        READ_CACHE.put(owner, job_id, body, _ReadCache.TERMINAL_TTL_S if status in TERMINAL else cache_s, read_at)
    return body


def _query_job_json(owner: str, job_id: str) -> tuple[bytes, str, bool]:
    """The body of ``GET /v1/jobs/{id}`` in one round trip: no ORM session, no transaction, no re-validation.

    Clients poll this endpoint; it builds the same JSON as ``job_out`` (a test compares them) from one
    outer join of the job with its artifacts, read in autocommit mode.
    """
    j, a = Job.__table__, Artifact.__table__
    stmt = (
        select(*j.c, *(a.c[name].label(f"art_{name}") for name in _ARTIFACT_COLUMNS))
        .select_from(j.outerjoin(a, a.c.job_id == j.c.id))
        .where(j.c.id == job_id)
        .order_by(a.c.name)
    )
    with get_engine().execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
        rows = conn.execute(stmt).all()
    if not rows or rows[0].owner != owner:
        raise not_found("job", job_id)
    job = rows[0]
    artifacts = [
        {**{n: getattr(r, f"art_{n}") for n in _ARTIFACT_COLUMNS}, "url": f"/v1/artifacts/{r.art_id}/content"}
        for r in rows
        if r.art_id is not None
    ]
    for art in artifacts:
        art["created_at"] = _iso(art["created_at"])
        art["meta"] = art["meta"] or {}
    stored: dict[str, Any] = job.result or {}
    result = None
    if stored or artifacts:
        report = stored.get("report") if "report" in stored else {k: v for k, v in stored.items() if k != "artifacts"}
        result = {"artifacts": artifacts, "report": report or {}, "warnings": _warnings(stored, report),
                  "cached_from": stored.get("cached_from"), "best": stored.get("best")}
    error = None
    if job.error:
        error = {"code": str(job.error.get("code", "error")), "message": str(job.error.get("message", "")),
                 "step": job.error.get("step")}
    body = {
        "id": job.id,
        "name": job.name,
        "metadata": job.metadata or {},
        "status": job.status,
        "phase": job.phase,
        "progress": {**_PROGRESS_DEFAULTS, **(job.progress or {})},
        "attempt": job.attempt,
        "queue": job.queue,
        "error": error,
        "result": result,
        "spec": job.spec,
        "timestamps": {"created_at": _iso(job.created_at), "updated_at": _iso(job.updated_at),
                       "started_at": _iso(job.started_at), "finished_at": _iso(job.finished_at)},
    }
    return json.dumps(body, separators=(",", ":"), default=str).encode(), job.status, bool(job.delete_requested)


def get_job(session: Session, owner: str, job_id: str) -> Job:
    """The owner's job, or 404 (read fresh from the database)."""
    return get_owned(session, Job, owner, job_id, fresh=True)


def _by_key(session: Session, owner: str, key: str) -> Job | None:
    return session.scalars(select(Job).where(Job.owner == owner, Job.idempotency_key == key)).first()


def _same_request(job: Job, spec: JobSpec) -> Job:
    if job.spec != spec.model_dump(mode="json"):
        raise ProblemError(
            422,
            "idempotency_key_reused",
            "Idempotency-Key was already used for a different job spec",
            errors=[{"field": "Idempotency-Key", "message": "already used for a different job spec"}],
        )
    return job


def _check_trials(session: Session, owner: str, spec: JobSpec) -> None:
    """Each explicit trial of a search passes the submit checks a job with its steps would (422 naming
    ``search.space.<i>.<field>``); ``auto`` trials are derived from what these checks already accepted, after
    the search's ``prefix`` (checked alone: ``search.prefix.<field>``)."""
    from models.spec import trial_spec

    assert spec.search is not None
    space = spec.search.space
    trials = ([(f"search.space.{i}", steps) for i, steps in enumerate(space)] if isinstance(space, list)
              else [("search.prefix", [])] if spec.search.prefix else [])
    for at, steps in trials:
        try:
            check_references(session, owner, trial_spec(spec, steps))
        except ProblemError as e:
            errors = [{**err, "field": f"{at}.{err.get('field')}"} for err in e.errors or []]
            detail = "; ".join(f"{err['field']}: {err.get('message', '')}" for err in errors) or e.detail
            raise ProblemError(e.status, e.code, detail, errors=errors) from e


def submit(
    owner: str, spec: JobSpec, idempotency_key: str | None, settings: Settings, labels: JobLabels | None = None
) -> tuple[JobOut, bool]:
    """``POST /v1/jobs`` in one thread and one session: (the job's body, whether it was created now).

    The body of a new job is built without a query after its commit, so once the job exists nothing
    but the broker (which marks it failed) can turn the answer into an error."""
    with session_scope() as session:
        job, created = create_job(session, owner, spec, idempotency_key, settings, labels)
        return job_out(None if created else session, job), created


def create_job(
    session: Session,
    owner: str,
    spec: JobSpec,
    idempotency_key: str | None,
    settings: Settings,
    labels: JobLabels | None = None,
) -> tuple[Job, bool]:
    """Validate references, insert the job and its first event, commit, then enqueue; (job, created)."""
    labels = labels or JobLabels()
    if idempotency_key is not None:
        if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise field_error(422, "validation_error", "Idempotency-Key", f"1 to {MAX_IDEMPOTENCY_KEY} characters")
        existing = _by_key(session, owner, idempotency_key)
        if existing is not None:
            return _same_request(existing, spec), False
    model = check_references(session, owner, spec)
    routed = check_memory(spec, model, settings)  # the CUDA queue for training a model this large
    # The owner's lock is held until the commit below, so concurrent submissions count each other.
    quotas.check_jobs(session, owner, settings, lock=True)
    if spec.search is not None:
        _check_trials(session, owner, spec)
    queue = routed or settings.queue_for(spec)
    job = Job(
        id=new_id("job"),
        owner=owner,
        status=QUEUED,
        phase="queued",
        progress={"step": 0, "steps": len(spec.steps), "percent": 0.0},
        spec=spec.model_dump(mode="json"),
        model_id=model.id,
        queue=queue,
        attempt=0,
        max_attempts=settings.max_attempts,
        idempotency_key=idempotency_key,
        name=labels.name,
        metadata_=dict(labels.metadata) or None,
    )
    session.add(job)
    session.add(JobEvent(job_id=job.id, kind="status", message=queued_message(queue, settings.gpu_queue, settings.cuda_queue), data={"status": QUEUED}))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        existing = _by_key(session, owner, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _same_request(existing, spec), False
    _enqueue(session, job)
    return job, True


def _enqueue(session: Session, job: Job) -> None:
    """Send the task; when the broker refuses, remove the job (and its first event) and answer 503 with
    Retry-After: an answer that is not 2xx leaves no job, and a retry with the same Idempotency-Key makes it anew.
    (With the database down too, the row stays queued and the worker's reconcile queues it once the broker
    is back.)"""
    from worker.celery_app import enqueue_job

    try:
        enqueue_job(job.id, job.queue)
    except Exception as exc:
        log.error("enqueue of %s on %s failed: %s", job.id, job.queue, exc, exc_info=True)
        _remove_unqueued(session, job.id)
        raise ProblemError(
            503, "broker_unavailable",
            f"the job could not be queued: the broker is unavailable ({type(exc).__name__}); nothing was "
            "recorded, submit again later",
            headers={"Retry-After": "5"},
        ) from exc


def _remove_unqueued(session: Session, job_id: str) -> None:
    """Delete a job the broker never got (still queued: nothing can have claimed it) and its events."""
    try:
        session.rollback()
        gone = session.execute(
            delete(Job).where(Job.id == job_id, Job.status == QUEUED).execution_options(synchronize_session=False)
        )
        if getattr(gone, "rowcount", 0):
            session.execute(delete(JobEvent).where(JobEvent.job_id == job_id))
        session.commit()
    except Exception:
        log.exception("job %s was not queued and could not be removed", job_id)
        session.rollback()


def parse_meta_filters(values: list[str] | None) -> dict[str, str]:
    """``["k=v", ...]`` (the ``meta`` query parameter, repeated) as a dict; 422 naming ``meta`` otherwise."""
    wanted: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key or "\x00" in item:
            raise field_error(422, "validation_error", "meta", f"{item!r} is not key=value")
        wanted[key] = value
    return wanted


def list_jobs(
    session: Session,
    owner: str,
    status: str | None,
    after: str | None,
    limit: int,
    name: str | None = None,
    meta: dict[str, str] | None = None,
    parent: str | None = None,
    top_level: bool = False,
) -> Page[JobOut]:
    """A page of the owner's jobs, newest first, optionally of one status, one name, metadata key/values
    (all must match) or one search's trials (``parent``: the search job's id, 404 unless the owner's);
    ``top_level``: no search trials (the dashboard lists a search once); cursor = last id of the page."""
    query = select(Job).where(Job.owner == owner)
    if top_level:
        query = query.where(Job.parent_id.is_(None))
    if parent is not None:
        get_job(session, owner, parent)
        query = query.where(Job.parent_id == parent)
    if status is not None:
        if status not in STATUSES:
            raise field_error(422, "validation_error", "status", f"{status!r} is not one of {', '.join(STATUSES)}")
        query = query.where(Job.status == status)
    if name is not None:
        query = query.where(Job.name == name)
    for key, value in (meta or {}).items():
        query = query.where(Job.metadata_[key].as_string() == value)
    rows, cursor = paginate(session, query, Job.id, after, limit)
    return Page[JobOut](data=[job_out(session, j) for j in rows], next_cursor=cursor)


def _cancel_trials(session: Session, owner: str, search: Job) -> None:
    """A cancelled search cancels every trial not yet ended, then asks a worker to wind the search up
    (its trials' workers would otherwise be the only ones to advance it, and queued trials have none)."""
    from worker.celery_app import enqueue_advance

    children = session.scalars(select(Job.id).where(Job.parent_id == search.id, Job.status.not_in(TERMINAL)))
    for child_id in list(children):
        with contextlib.suppress(ProblemError):
            cancel_job(session, owner, child_id)
    try:
        enqueue_advance(search.id, search.queue)
    except Exception as exc:  # the trials' workers still advance it as each trial ends
        log.warning("advance of cancelled search %s not queued: %s", search.id, exc)


def cancel_job(session: Session, owner: str, job_id: str) -> Job:
    """Cancel: queued → cancelled now; running → cancelling (the worker finishes it); terminal → 409."""
    for _ in range(5):
        job = get_job(session, owner, job_id)
        if job.status in TERMINAL:
            raise ProblemError(409, "job_terminal", f"job {job_id} is already {job.status}; it cannot be cancelled")
        if job.status == CANCELLING:
            return job
        now = utcnow()
        if job.status == QUEUED:
            values: dict[str, Any] = {"status": CANCELLED, "phase": "cancelled", "cancel_requested": True,
                                      "finished_at": now, "updated_at": now}
            event = JobEvent(job_id=job_id, kind="status", message="cancelled before it started",
                             data={"status": CANCELLED})
        elif job.status == RUNNING:
            values = {"status": CANCELLING, "cancel_requested": True, "updated_at": now}
            event = JobEvent(job_id=job_id, kind="status", message="cancel requested; stopping at the next check",
                             data={"status": CANCELLING})
        else:
            raise ProblemError(409, "conflict", f"job {job_id} is {job.status}")
        res = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.owner == owner, Job.status == job.status)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if getattr(res, "rowcount", 0) == 1:
            session.add(event)
            session.commit()
            READ_CACHE.drop(job_id)
            if job.status == RUNNING and (job.spec or {}).get("search") is not None:
                _cancel_trials(session, owner, job)
            return get_job(session, owner, job_id)
        session.rollback()  # the worker moved the job meanwhile: look again
    raise ProblemError(409, "conflict", f"job {job_id} kept changing state; try again")
