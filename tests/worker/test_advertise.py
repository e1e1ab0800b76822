"""This worker's advertisement: the GPU probe in a child process, its queues, the heartbeat written by the
timers thread."""

from __future__ import annotations

import os
import time
from datetime import datetime

import pytest
import torch

from models.memory_fit import machine_memory_bytes
from models.settings import get_settings
from models.workers import live_fleet
from worker import advertise
from worker.advertise import Gpu, beat, configure, probe_gpu, queues_for
from worker.reconcile import Timers


def test_probe_finds_what_torch_finds_without_touching_cuda_here() -> None:
    gpu = probe_gpu()
    assert gpu.count == torch.cuda.device_count()
    assert (gpu.name is None) == (gpu.count == 0) and (gpu.memory > 0) == (gpu.count > 0)
    assert not torch.cuda.is_initialized()


def test_a_worker_with_a_gpu_also_consumes_the_cuda_queue(pg_env: str) -> None:
    s = get_settings()
    assert queues_for(None, Gpu()) == [s.cpu_queue, s.gpu_queue]
    assert queues_for(["cpu"], Gpu(1, "NVIDIA H100", 80 * 10**9)) == ["cpu", s.cuda_queue]
    assert queues_for(["cpu", s.cuda_queue], Gpu(1, "x", 1)) == ["cpu", s.cuda_queue]


def test_beat_advertises_this_machine(pg_env: str) -> None:
    configure(["cpu-x", "gpu-x"], "modelpress-test@host", Gpu())
    try:
        advert = beat()
        assert advert is not None
        fleet = live_fleet(60)
        assert [w.id for w in fleet.workers] == [advert.id]
        me = fleet.workers[0]
        assert me.memory_total == machine_memory_bytes() and 0 < me.memory_free <= me.memory_total
        assert me.queues == ["cpu-x", "gpu-x"] and me.gpu_count == 0 and me.gpu_name is None
        advertise.leave()
        assert beat() is None and live_fleet(60).workers == []  # no heartbeat after leaving brings it back
    finally:
        advertise._SELF.clear()


def test_the_timers_thread_keeps_the_heartbeat(pg_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPRESS_WORKER_HEARTBEAT_S", "0.2")
    monkeypatch.setenv("MODELPRESS_WORKER_MEMORY_BYTES", str(5 * 10**9))
    monkeypatch.setenv("MODELPRESS_RECONCILE_INTERVAL_S", "0")
    monkeypatch.setenv("MODELPRESS_GC_INTERVAL_S", "0")
    get_settings.cache_clear()
    configure(["cpu-x"], "modelpress-timers@host", Gpu())
    timers = Timers()
    timers.start()
    try:
        seen: list[datetime] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(set(seen)) < 2:  # two heartbeats: it is refreshed
            workers = live_fleet(60).workers
            seen += [w.heartbeat_at for w in workers]
            time.sleep(0.05)
        assert len(set(seen)) >= 2
        assert [(w.id, w.memory_total) for w in workers] == [(f"modelpress-timers@host:{os.getpid()}", 5 * 10**9)]
    finally:
        timers.stopped.set()
        timers.join(timeout=5)
        advertise._SELF.clear()
