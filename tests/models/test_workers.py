"""The workers' advertisements: written, refreshed, read back as the live fleet, aged out and withdrawn."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from models.db import session_scope
from models.tables import WorkerRecord, utcnow
from models.workers import Advert, advertise, live_fleet, withdraw

GB = 10**9


def _advert(name: str, memory: int, gpu: int = 0, queues: tuple[str, ...] = ("cpu", "gpu")) -> Advert:
    return Advert(id=f"{name}:1", hostname=name, queues=list(queues), memory_total=memory, memory_free=memory // 2,
                  gpu_name="NVIDIA H100" if gpu else None, gpu_count=1 if gpu else 0, gpu_memory=gpu)


def test_live_fleet_is_the_workers_heard_from_within_the_window(pg_env: str) -> None:
    now = utcnow()
    advertise(_advert("small", 8 * GB), live_s=60, now=now - timedelta(seconds=30))
    advertise(_advert("big", 64 * GB), live_s=60, now=now)
    advertise(_advert("gone", 512 * GB), live_s=60, now=now - timedelta(seconds=120))
    fleet = live_fleet(60, now=now)
    assert sorted(w.hostname for w in fleet.workers) == ["big", "small"]
    assert fleet.largest_memory is not None and fleet.largest_memory.hostname == "big"
    assert fleet.gpu_workers("cuda") == []


def test_gpu_workers_are_those_on_the_cuda_queue_largest_first(pg_env: str) -> None:
    advertise(_advert("a", 64 * GB, gpu=80 * GB, queues=("cpu", "gpu")), live_s=60)  # a GPU, but not consuming cuda
    advertise(_advert("b", 64 * GB, gpu=24 * GB, queues=("cpu", "gpu", "cuda")), live_s=60)
    advertise(_advert("c", 32 * GB, gpu=48 * GB, queues=("cuda",)), live_s=60)
    advertise(_advert("d", 128 * GB, gpu=48 * GB, queues=("cuda",)), live_s=60)
    assert [w.hostname for w in live_fleet(60).gpu_workers("cuda")] == ["d", "c", "b"]


def test_a_refresh_keeps_the_start_and_long_silent_rows_are_dropped(pg_env: str) -> None:
    now = utcnow()
    advertise(_advert("w", 8 * GB), live_s=60, now=now - timedelta(seconds=50))
    advertise(_advert("dead", 8 * GB), live_s=60, now=now - timedelta(hours=1))
    advertise(_advert("w", 9 * GB), live_s=60, now=now)
    with session_scope() as s:
        rows = {r.hostname: r for r in s.scalars(select(WorkerRecord))}
    assert set(rows) == {"w"}  # 'dead' was silent for more than 10 live windows
    assert rows["w"].memory_total == 9 * GB and rows["w"].heartbeat_at == now
    assert rows["w"].started_at == now - timedelta(seconds=50)
    withdraw("w:1")
    assert live_fleet(60).workers == []
