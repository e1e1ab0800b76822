"""Start a Celery worker (``modelpress worker``); the parent process never touches CUDA. A worker with a GPU
also consumes the CUDA queue (``worker.advertise``)."""

from __future__ import annotations

import argparse
import socket

from models.settings import get_settings


def worker_argv(queues: list[str] | None, concurrency: int = 1, loglevel: str = "INFO") -> list[str]:
    """Arguments for ``celery worker``: prefork pool, one task per child at a time, queues from settings."""
    s = get_settings()
    names = queues or [s.cpu_queue, s.gpu_queue]
    return [
        "worker",
        f"--queues={','.join(names)}",
        f"--concurrency={concurrency}",
        "--pool=prefork",
        f"--loglevel={loglevel}",
        f"--hostname=modelpress-{'-'.join(names)}@{socket.gethostname()}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def run_worker(queues: list[str] | None = None, concurrency: int = 1, loglevel: str = "INFO") -> None:
    """Run a worker in this process until it is stopped (SIGTERM: warm shutdown)."""
    import worker.tasks  # noqa: F401  (registers the task)
    from worker.advertise import configure, probe_gpu, queues_for
    from worker.celery_app import get_celery

    gpu = probe_gpu()  # in a child process: this one never touches CUDA
    names = queues_for(queues, gpu)
    argv = worker_argv(names, concurrency, loglevel)
    configure(names, next(a for a in argv if a.startswith("--hostname=")).partition("=")[2], gpu)
    get_celery().worker_main(argv)


def main() -> None:
    """``python -m worker.main --queues cpu,gpu``."""
    p = argparse.ArgumentParser(description="modelpress worker")
    p.add_argument("--queues", default="")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--loglevel", default="INFO")
    a = p.parse_args()
    run_worker([q for q in a.queues.split(",") if q] or None, a.concurrency, a.loglevel)


if __name__ == "__main__":
    main()
