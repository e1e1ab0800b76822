"""The Celery app follows docs/architecture.md §7 (worker rules): late acks, reject on loss, prefetch 1, JSON, sane limits."""

from __future__ import annotations

from worker.celery_app import TASK_NAME, make_celery
from worker.main import worker_argv


def test_reliability_settings(pg_env: str, redis_url: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_BROKER_URL", redis_url)
    get_settings.cache_clear()
    conf = make_celery().conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_cancel_long_running_tasks_on_connection_loss
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_soft_time_limit < conf.task_time_limit < conf.broker_transport_options["visibility_timeout"]


def test_task_is_registered_under_its_public_name(pg_env: str) -> None:
    import worker.tasks

    assert worker.tasks.run_job.name == TASK_NAME
    assert worker.tasks.app.tasks[TASK_NAME].acks_late


def test_worker_listens_on_both_queues_by_default(pg_env: str) -> None:
    argv = worker_argv(None)
    queues = next(a for a in argv if a.startswith("--queues=")).split("=", 1)[1].split(",")
    assert len(queues) == 2 and all(q.startswith(("cpu", "gpu")) for q in queues)
    assert "--pool=prefork" in argv and "--concurrency=1" in argv
