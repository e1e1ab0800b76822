"""worker.reconcile: queued jobs whose message may be lost and running jobs whose worker is gone are re-sent.

The broker-restart fault itself (a real Redis restarted under a real Celery worker) is in
tests/e2e/test_faults.py; these check the selection, the at-most-once-per-threshold guard and the handover.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from models.db import session_scope
from models.settings import get_settings
from models.tables import Job, JobEvent, utcnow
from tests.api import builders
from worker.reconcile import Timers, reconcile
from worker.records import claim


class Sent:
    """Records what the reconciler hands to the broker (the real send is exercised in the e2e fault test)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, job_id: str, queue: str) -> None:
        with self.lock:
            self.calls.append((job_id, queue))


def _set(job_id: str, seconds_ago: float, **values: object) -> None:
    then = utcnow() - timedelta(seconds=seconds_ago)
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == job_id).values(updated_at=then, **values))


@pytest.fixture(params=["pg_env", "sqlite_env"])
def settings(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    request.getfixturevalue(request.param)  # the guarded UPDATE compares timestamps: both databases
    monkeypatch.setenv("MODELPRESS_RECONCILE_QUEUED_AFTER_S", "60")
    monkeypatch.setenv("MODELPRESS_JOB_LEASE_SECONDS", "30")
    get_settings.cache_clear()
    return get_settings()


def test_old_queued_and_stale_running_jobs_are_resent_once(settings) -> None:  # type: ignore[no-untyped-def]
    model = builders.insert_model()
    lost = builders.insert_job(model, status="queued")
    _set(lost, 120)
    waiting = builders.insert_job(model, status="queued")  # submitted just now: its message is in flight
    dead = builders.insert_job(model, status="running")
    _set(dead, 90, heartbeat_at=utcnow() - timedelta(seconds=90), attempt=1)
    alive = builders.insert_job(model, status="running")
    _set(alive, 90, heartbeat_at=utcnow() - timedelta(seconds=5), attempt=1)
    sent = Sent()
    out = reconcile(settings, enqueue=sent)
    assert out.queued == [lost] and out.running == [dead] and out.cancelled == []
    assert sorted(sent.calls) == sorted([(lost, "cpu"), (dead, "cpu")])
    assert waiting not in out.queued and alive not in out.running
    assert reconcile(settings, enqueue=sent).queued == [] and len(sent.calls) == 2  # not again before the threshold
    with session_scope() as s:
        messages = s.scalars(select(JobEvent.message).where(JobEvent.job_id == lost).order_by(JobEvent.id)).all()
    assert messages[-1].startswith("re-enqueued")


def test_concurrent_reconcilers_send_each_job_once(settings) -> None:  # type: ignore[no-untyped-def]
    model = builders.insert_model()
    jobs = [builders.insert_job(model, status="queued") for _ in range(6)]
    for j in jobs:
        _set(j, 300)
    sent = Sent()
    threads = [threading.Thread(target=reconcile, args=(settings,), kwargs={"enqueue": sent}) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(j for j, _ in sent.calls) == sorted(jobs)


def test_stale_cancelling_job_becomes_cancelled(settings) -> None:  # type: ignore[no-untyped-def]
    job = builders.insert_job(builders.insert_model(), status="cancelling")
    _set(job, 90, heartbeat_at=utcnow() - timedelta(seconds=90))
    out = reconcile(settings, enqueue=Sent())
    assert out.cancelled == [job]
    with session_scope() as s:
        row = s.get(Job, job)
        assert row is not None and row.status == "cancelled" and row.finished_at is not None


def test_resent_running_job_is_taken_over_by_the_next_claim(settings) -> None:  # type: ignore[no-untyped-def]
    job = builders.insert_job(builders.insert_model(), status="running")
    _set(job, 90, heartbeat_at=utcnow() - timedelta(seconds=90), attempt=1, worker="dead-host:1")
    sent = Sent()
    assert reconcile(settings, enqueue=sent).running == [job]
    won = claim(sent.calls[0][0], "new-host:2")  # what the redelivered task does
    assert won is not None and won.attempt == 2
    with session_scope() as s:
        row = s.get(Job, job)
        assert row is not None and row.worker == "new-host:2" and row.status == "running"


def test_timers_thread_runs_both_and_survives_errors(settings, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import worker.gc
    import worker.reconcile

    calls: list[str] = []

    def failing_gc(_s: object) -> None:
        calls.append("gc")
        raise RuntimeError("database unavailable")

    monkeypatch.setattr(worker.gc, "run_gc", failing_gc)
    monkeypatch.setattr(worker.reconcile, "reconcile", lambda _s: calls.append("reconcile"))
    s = settings.model_copy(update={"gc_interval_s": 0.2, "reconcile_interval_s": 0.1})
    timers = Timers(s)
    timers.start()
    try:
        deadline = utcnow() + timedelta(seconds=5)
        while (calls.count("gc") < 2 or calls.count("reconcile") < 3) and utcnow() < deadline:
            threading.Event().wait(0.05)
    finally:
        timers.stopped.set()
        timers.join(5)
    assert calls.count("gc") >= 2 and calls.count("reconcile") >= 3 and not timers.is_alive()


def test_each_resend_of_a_queued_job_waits_twice_as_long(settings) -> None:  # type: ignore[no-untyped-def]
    job = builders.insert_job(builders.insert_model(), status="queued")
    _set(job, 90, resends=1)  # re-sent once already: the next one is due after 2 x 60 s
    sent = Sent()
    assert reconcile(settings, enqueue=sent).queued == []
    _set(job, 130)
    assert reconcile(settings, enqueue=sent).queued == [job]
    with session_scope() as s:
        row = s.get(Job, job)
        assert row is not None and row.resends == 2


def test_a_search_waiting_on_its_trials_is_not_resent(settings) -> None:  # type: ignore[no-untyped-def]
    """A search is running with no worker on it while its trials run: a stale heartbeat is not a lost worker."""
    model = builders.insert_model()
    search = builders.insert_job(model, status="running")
    _set(search, 600, heartbeat_at=utcnow() - timedelta(seconds=600), attempt=1)
    trial = builders.insert_job(model, status="running")
    _set(trial, 5, heartbeat_at=utcnow(), attempt=1, parent_id=search)
    lone = builders.insert_job(model, status="running")  # the same staleness without trials: resent
    _set(lone, 600, heartbeat_at=utcnow() - timedelta(seconds=600), attempt=1)
    sent = Sent()
    out = reconcile(settings, enqueue=sent)
    assert out.running == [lone] and sent.calls == [(lone, "cpu")]
