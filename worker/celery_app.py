"""The Celery app (docs/architecture.md §7, worker rules): late acks, reject on worker loss, prefetch 1, JSON only."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from models.settings import get_settings

TASK_NAME = "modelpress.run_job"
ADVANCE_TASK = "modelpress.advance_search"


def make_celery() -> Celery:
    """A Celery app configured from settings (broker: Redis, or embedded SQLite via kombu's sqla)."""
    s = get_settings()
    app = Celery("modelpress", broker=s.broker_url, include=["worker.tasks"])
    transport_options: dict[str, object] = {"visibility_timeout": s.visibility_timeout}
    if s.broker_url.startswith("sqla+"):
        # kombu's SQLAlchemy transport hands its options to create_engine.
        transport_options = {"connect_args": {"timeout": 30}}
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        task_soft_time_limit=s.task_soft_time_limit,
        task_time_limit=s.task_hard_time_limit,
        task_default_queue=s.cpu_queue,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app


@lru_cache(maxsize=1)
def get_celery() -> Celery:
    """The process-wide Celery app."""
    return make_celery()


def enqueue_job(job_id: str, queue: str) -> None:
    """Send the run-job task for ``job_id`` to ``queue`` (call only after the job row is committed)."""
    get_celery().send_task(TASK_NAME, args=[job_id], queue=queue)


def enqueue_advance(search_id: str, queue: str) -> None:
    """Ask a worker to advance search ``search_id`` (start/skip trials, finalize): idempotent, cheap."""
    get_celery().send_task(ADVANCE_TASK, args=[search_id], queue=queue)
