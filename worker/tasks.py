"""The Celery task: takes only a job id; everything else lives in the database."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from worker.celery_app import ADVANCE_TASK, TASK_NAME, get_celery

app = get_celery()


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    """A forked pool child must not reuse the parent's DB connections."""
    from models.db import reset_engines

    reset_engines(close=False)  # the parent's connections stay the parent's (its timers thread uses them)


@worker_ready.connect
def _start_timers(**_: Any) -> None:
    """The worker's main process runs the reconciler and gc (worker/reconcile.py) on their intervals."""
    from worker.reconcile import start_timers

    start_timers()


@worker_shutdown.connect
def _withdraw(**_: Any) -> None:
    """A stopping worker withdraws its advertisement: admission stops counting it at once."""
    from worker.advertise import leave

    try:
        leave()
    except Exception:  # the database may be gone too; the row then ages out of the live window
        logging.getLogger("modelpress.worker").warning("could not withdraw the advertisement", exc_info=True)


@app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> str | None:
    """Run job ``job_id`` (claim, pipeline, record); returns the terminal status it set."""
    from worker.jobs import execute
    from worker.memory import release_memory

    try:
        return execute(job_id)
    finally:
        release_memory()  # an idle worker gives back what the job freed (worker.memory)


@app.task(name=ADVANCE_TASK, acks_late=True, reject_on_worker_lost=True)
def advance_search(search_id: str) -> str | None:
    """Advance search ``search_id`` after one of its trials ended (or it was cancelled)."""
    from worker.search import advance

    return advance(search_id)
