"""The workers' advertisements (docs/architecture.md §7): each worker writes its queues, memory and GPU at
start and refreshes them with a heartbeat (``worker.advertise``); the API plans admission and routing against
the live ones (``api.services.memory_check``). Rows live in the database, so the embedded SQLite stack and the
PostgreSQL one work alike; a row unheard from for ``STALE_AFTER_LIVE`` live windows is removed."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from models.db import session_scope
from models.tables import WorkerRecord, utcnow

STALE_AFTER_LIVE = 10


@dataclass(frozen=True)
class Advert:
    """What one worker says about itself."""

    id: str
    hostname: str
    queues: list[str]
    memory_total: int
    memory_free: int
    gpu_name: str | None = None
    gpu_count: int = 0
    gpu_memory: int = 0
    heartbeat_at: datetime | None = None  # as read back (None: not yet written)


def advertise(advert: Advert, live_s: float, now: datetime | None = None) -> None:
    """Write (or refresh) ``advert`` with a heartbeat of ``now``; drop rows silent for long (dead workers)."""
    now = now or utcnow()
    with session_scope() as s:
        row = s.get(WorkerRecord, advert.id)
        if row is None:
            row = WorkerRecord(id=advert.id, started_at=now)
            s.add(row)
        row.hostname, row.queues = advert.hostname, list(advert.queues)
        row.memory_total, row.memory_free = advert.memory_total, advert.memory_free
        row.gpu_name, row.gpu_count, row.gpu_memory = advert.gpu_name, advert.gpu_count, advert.gpu_memory
        row.heartbeat_at = now
        s.execute(delete(WorkerRecord).where(
            WorkerRecord.heartbeat_at < now - timedelta(seconds=live_s * STALE_AFTER_LIVE)))


def withdraw(worker_id: str) -> None:
    """Remove a stopping worker's advertisement."""
    with session_scope() as s:
        s.execute(delete(WorkerRecord).where(WorkerRecord.id == worker_id))


@dataclass(frozen=True)
class Fleet:
    """The live workers, as admission sees them."""

    workers: list[Advert] = field(default_factory=list)

    @property
    def largest_memory(self) -> Advert | None:
        """The live worker with the most memory (None: none live)."""
        return max(self.workers, key=lambda w: w.memory_total, default=None)

    def gpu_workers(self, queue: str) -> list[Advert]:
        """The live workers with a GPU consuming ``queue``, the largest GPU (then the most RAM) first."""
        gpus = [w for w in self.workers if w.gpu_count and queue in w.queues]
        return sorted(gpus, key=lambda w: (w.gpu_memory, w.memory_total), reverse=True)


def live_fleet(live_s: float, now: datetime | None = None) -> Fleet:
    """The workers heard from within ``live_s`` seconds."""
    since = (now or utcnow()) - timedelta(seconds=live_s)
    with session_scope() as s:
        rows = s.scalars(select(WorkerRecord).where(WorkerRecord.heartbeat_at >= since)).all()
        return Fleet([Advert(r.id, r.hostname, list(r.queues or []), r.memory_total, r.memory_free, r.gpu_name,
                             r.gpu_count, r.gpu_memory, r.heartbeat_at) for r in rows])
