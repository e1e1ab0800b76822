"""Child jobs of a running job, one per (step, task): the single-task baselines (``worker/baselines.py``) and the
task adapters of ``adapters: merge`` (``worker/adapter_jobs.py``). Spread over the workers as a search's trials
are (docs/architecture.md §10), but the parent holds its slot and waits for them itself.

:func:`start` takes each child from the whole-job cache when an identical job of the owner succeeded before (same
model sha, data shas and parameters: its key), keeps the children an earlier attempt queued, and queues the rest
(``parent_id``, metadata ``<tag>: <step>:<task>``). :func:`wait` polls them to their end, running one still queued
on the parent's own worker (a one-slot worker would otherwise wait on itself). :func:`cancel`, at the parent's end
however it ends, cancels the children not yet ended; a running child also stops at its next cancel check once its
parent's cancel flag is set (``DBContext``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from models.db import session_scope
from models.ids import new_id
from models.queues import queued_message
from models.settings import get_settings
from models.spec import JobSpec
from models.tables import CANCELLED, CANCELLING, QUEUED, RUNNING, SUCCEEDED, TERMINAL, Job, JobEvent, utcnow
from worker.records import Claim

log = logging.getLogger(__name__)

POLL_S = 0.5  # between looks at the children's states while waiting


@dataclass
class TaskJob:
    """One task's child job of step ``step``, or the cached job whose report stands for it, and how it ended."""

    step: int
    task: str
    spec: JobSpec
    job_id: str | None = None
    cached_from: str | None = None
    report: dict[str, Any] | None = None
    status: str | None = None
    error: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        """Its metadata value: ``<step index>:<task name>``."""
        return f"{self.step}:{self.task}"

    @property
    def source(self) -> str | None:
        """The job whose artifacts are this task's: the child, or the cached job."""
        return self.job_id or self.cached_from


def cached(owner: str, spec: JobSpec) -> tuple[str, dict[str, Any]] | None:
    """An identical job of ``owner`` that succeeded before: its id and report."""
    from worker.context import default_device
    from worker.stage_cache.keys import db_shas, job_key
    from worker.stage_cache.reuse import finished_job

    try:
        key = job_key(spec, db_shas(spec), default_device())
    except KeyError:
        return None
    hit = finished_job(owner, key, "")
    return None if hit is None else (hit.job_id, dict(hit.result.get("report") or {}))


def start(claim: Claim, owner: str, use_cache: bool, tag: str, items: list[TaskJob], what: str) -> list[TaskJob]:
    """Each item from the cache or an earlier attempt's child, else queued as a child job of ``claim``'s job
    (``what`` names it in the job's name and queued event: ``single-task baseline``); the items queued now."""
    with session_scope() as s:
        earlier = {(c.metadata_ or {}).get(tag): c.id
                   for c in s.scalars(select(Job).where(Job.parent_id == claim.job_id))}
    settings = get_settings()
    queued: list[TaskJob] = []
    for item in items:
        hit = cached(owner, item.spec) if use_cache else None
        if hit is not None:
            item.cached_from, item.report, item.status = hit[0], hit[1], SUCCEEDED
            continue
        if earlier.get(item.label):
            item.job_id = earlier[item.label]
            continue
        with session_scope() as s:
            job = s.get(Job, claim.job_id)
            assert job is not None
            child = Job(id=new_id("job"), owner=job.owner, status=QUEUED, phase="queued",
                        progress={"step": 0, "steps": len(item.spec.steps), "percent": 0.0},
                        spec=item.spec.model_dump(mode="json"), metadata_={tag: item.label},
                        model_id=job.model_id, queue=settings.queue_for(item.spec), attempt=0,
                        max_attempts=job.max_attempts, parent_id=job.id,
                        name=f"{job.name or job.id}: {what} of {item.task}"[-255:])
            s.add(child)
            s.add(JobEvent(job_id=child.id, kind="status", data={"status": QUEUED},
                           message=queued_message(child.queue, settings.gpu_queue)
                           + f" ({what} of task {item.task!r} of job {job.id})"))
            item.job_id = child.id
            queued.append(item)
    for item in queued:
        assert item.job_id is not None
        _enqueue(item.job_id, settings.queue_for(item.spec))
    return queued


def _enqueue(child_id: str, queue: str) -> None:
    from worker.celery_app import enqueue_job

    try:
        enqueue_job(child_id, queue)
    except Exception as exc:  # the parent's own worker runs it in wait()
        log.warning("child job %s not queued (%s); its parent's worker will run it", child_id, exc)


def _cancel_requested(job_id: str) -> bool:
    with session_scope() as s:
        return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def wait(claim: Claim, items: list[TaskJob], run_here: Callable[[str], None], check_cancelled: Callable[[], None],
         ended: Callable[[TaskJob], None] | None = None) -> None:
    """Wait for every item's child to end (running a queued one here with ``run_here``), noting each one's status,
    error and report; ``ended(item)`` as each ends. JobCancelled once the parent is cancelled."""
    from worker.core import JobCancelled

    pending = [b for b in items if b.job_id and b.status is None]
    while pending:
        if _cancel_requested(claim.job_id):
            raise JobCancelled()
        check_cancelled()
        with session_scope() as s:
            rows = {j.id: (j.status, j.result, j.error) for j in s.scalars(
                select(Job).where(Job.id.in_([b.job_id for b in pending])))}
        still: list[TaskJob] = []
        ran = False
        for b in pending:
            assert b.job_id is not None
            status, result, error = rows.get(b.job_id, (CANCELLED, None, None))
            if status == QUEUED and not ran:
                run_here(b.job_id)  # claims it unless a worker did meanwhile
                ran = True
                still.append(b)
            elif status in TERMINAL:
                b.status, b.error = status, error
                b.report = (result or {}).get("report") if status == SUCCEEDED else None
                if ended is not None:
                    ended(b)
            else:
                still.append(b)
        pending = still
        if pending and not ran:
            time.sleep(POLL_S)


def cancel(job_id: str) -> None:
    """Cancel this job's children not yet ended (queued ones at once, running ones at their next check)."""
    now = utcnow()
    with session_scope() as s:
        s.execute(update(Job).where(Job.parent_id == job_id, Job.status == QUEUED).values(
            status=CANCELLED, phase=CANCELLED, cancel_requested=True, finished_at=now, updated_at=now))
        s.execute(update(Job).where(Job.parent_id == job_id, Job.status == RUNNING).values(
            status=CANCELLING, cancel_requested=True, updated_at=now))
