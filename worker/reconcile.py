"""The job reconciler: the database, not the broker, decides which jobs still need a worker.

A broker restarted without persistence loses every queued message; with persistence, a task killed by
``worker_cancel_long_running_tasks_on_connection_loss`` waits hours for the visibility timeout. So every
``MODELPRESS_RECONCILE_INTERVAL_S`` the worker process re-enqueues

- ``queued`` jobs untouched for ``reconcile_queued_after_s`` (their message may be gone), and
- ``running`` jobs whose heartbeat is older than ``job_lease_seconds`` (their worker is gone): the
  redelivered task reclaims them (``worker.jobs.claim``), or fails them with ``worker_lost`` past
  ``max_attempts``;

and moves ``cancelling`` jobs with a stale heartbeat to ``cancelled`` (nobody is left to stop them);
then it deletes the jobs whose DELETE waited for them to stop (``worker.gc.finish_deferred_deletes``).
Each re-enqueue first bumps the row's ``updated_at`` with a guarded UPDATE, so two reconcilers never
both send it and a job is re-sent at most once per threshold. Duplicate deliveries are harmless: the
claim is one atomic UPDATE. The same thread runs ``worker.gc.run_gc`` every ``gc_interval_s``, starting
at once (leftovers of killed processes are cleaned at start).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import aliased

from models.db import session_scope
from models.settings import Settings, get_settings
from models.tables import CANCELLED, CANCELLING, QUEUED, RUNNING, Job, JobEvent, utcnow

log = logging.getLogger("modelpress.reconcile")
MAX_DOUBLINGS = 5


@dataclass
class Reconciled:
    """Job ids the reconciler acted on in one pass."""

    queued: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)


def _default_enqueue(job_id: str, queue: str) -> None:
    from worker.celery_app import enqueue_job

    enqueue_job(job_id, queue)


def _bump(job_id: str, was: str, seen: datetime, message: str, **values: Any) -> bool:
    """Guarded UPDATE (same status, same updated_at as when we looked) plus an event; whether it won."""
    with session_scope() as s:
        won = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == was, Job.updated_at == seen)
            .values(updated_at=utcnow(), **values)
            .returning(Job.id)
        ).scalar_one_or_none()
        if won is not None:
            data: dict[str, Any] = {"status": values.get("status", was), "reconciled": True}
            s.add(JobEvent(job_id=job_id, kind="status", message=message, data=data))
        return won is not None


def reconcile(settings: Settings | None = None, now: datetime | None = None,
              enqueue: Callable[[str, str], None] = _default_enqueue) -> Reconciled:
    """One pass (module doc); returns what it did."""
    settings = settings or get_settings()
    now = now or utcnow()
    queued_before = now - timedelta(seconds=settings.reconcile_queued_after_s)
    lease_before = now - timedelta(seconds=settings.job_lease_seconds)
    stale_beat = or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < lease_before)
    # A search (worker/search.py) stays running with no worker on it while its trials run; its trials'
    # ends advance it. Re-sending it would only burn its attempts, so a job with trials is left alone.
    trial = aliased(Job)
    not_a_search = ~exists().where(trial.parent_id == Job.id)
    with session_scope() as s:
        candidates = s.execute(select(Job.id, Job.queue, Job.updated_at, Job.resends)
                               .where(Job.status == QUEUED, Job.updated_at < queued_before)).all()
        # A job that waits behind a long queue is not lost: each re-send waits twice as long as the last.
        queued = [(jid, queue, seen) for jid, queue, seen, resends in candidates
                  if seen < now - timedelta(seconds=settings.reconcile_queued_after_s * 2 ** min(resends, MAX_DOUBLINGS))]
        running = s.execute(select(Job.id, Job.queue, Job.updated_at)
                            .where(Job.status == RUNNING, stale_beat, Job.updated_at < lease_before, not_a_search)).all()
        cancelling = s.execute(select(Job.id, Job.updated_at)
                               .where(Job.status == CANCELLING, stale_beat, Job.updated_at < lease_before, not_a_search)).all()
    out = Reconciled()
    for job_id, queue, seen in queued:
        if _bump(job_id, QUEUED, seen, "re-enqueued: queued with no worker on it (its message may be lost)",
                 resends=Job.resends + 1):
            enqueue(job_id, queue)
            out.queued.append(job_id)
    for job_id, queue, seen in running:
        if _bump(job_id, RUNNING, seen, "re-enqueued: its worker stopped sending heartbeats"):
            enqueue(job_id, queue)
            out.running.append(job_id)
    for job_id, seen in cancelling:
        if _bump(job_id, CANCELLING, seen, "cancelled: its worker stopped while cancelling",
                 status=CANCELLED, phase=CANCELLED, finished_at=utcnow()):
            out.cancelled.append(job_id)
    if out.queued or out.running or out.cancelled:
        log.warning("reconciler: re-enqueued queued %s, running %s; cancelled %s", out.queued, out.running, out.cancelled)
    return out


class Timers(threading.Thread):
    """A daemon thread in the worker's main process: the advertisement's heartbeat (worker.advertise), reconcile
    and gc on their intervals (0 turns one off)."""

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__(daemon=True, name="modelpress-timers")
        self.settings = settings or get_settings()
        self.stopped = threading.Event()

    def _every(self, interval: float, due: float, now: float, action: Callable[[], object], name: str) -> float:
        if interval <= 0 or now < due:
            return due
        try:
            action()
        except Exception:  # a DB or broker outage must not end the timer; the next round retries
            log.warning("%s failed", name, exc_info=True)
        return now + interval

    @staticmethod
    def _reconcile(s: Settings) -> None:
        from worker.gc import finish_deferred_deletes

        reconcile(s)
        finish_deferred_deletes()

    def run(self) -> None:
        import time

        from worker.advertise import beat
        from worker.gc import clean_leftovers, run_gc

        s = self.settings
        if s.gc_interval_s <= 0:  # leftovers are cleaned at start even with the periodic gc off
            self._every(1.0, 0.0, 1.0, lambda: clean_leftovers(s), "leftover cleanup")
        next_gc = next_reconcile = next_beat = time.monotonic()
        tick = min(x for x in (s.reconcile_interval_s, s.gc_interval_s, s.worker_heartbeat_s, 5.0) if x > 0)
        while not self.stopped.is_set():
            now = time.monotonic()
            next_beat = self._every(s.worker_heartbeat_s, next_beat, now, lambda: beat(s), "advertise")
            next_gc = self._every(s.gc_interval_s, next_gc, now, lambda: run_gc(s), "gc")
            next_reconcile = self._every(s.reconcile_interval_s, next_reconcile, now, lambda: self._reconcile(s),
                                         "reconcile")
            self.stopped.wait(tick)


_TIMERS: list[Timers] = []


def start_timers(**_: Any) -> None:
    """``worker_ready`` handler: start the timers once per worker process."""
    if not _TIMERS:
        timers = Timers()
        timers.start()
        _TIMERS.append(timers)
