"""This worker's advertisement (``models.workers``): its queues, memory and GPU, written at start and refreshed
by the timers thread's heartbeat (``worker.reconcile.Timers``), withdrawn at shutdown.

The GPU is found by a short child process (``probe_gpu``): the worker's parent process never touches CUDA
(docs/architecture.md §7), and a pool child that later initialises it is a fresh process."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass

from models.memory_fit import machine_free_memory_bytes, machine_memory_bytes
from models.settings import Settings, get_settings
from models.workers import Advert, advertise, withdraw

log = logging.getLogger("modelpress.worker.advertise")

_PROBE = (
    "import json, torch\n"
    "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
    "props = [torch.cuda.get_device_properties(i) for i in range(n)]\n"
    "print(json.dumps({'count': n, 'name': props[0].name if n else None,"
    " 'memory': max((p.total_memory for p in props), default=0)}))\n"
)


@dataclass(frozen=True)
class Gpu:
    """The CUDA devices this machine has: how many, the first one's name, the largest one's memory."""

    count: int = 0
    name: str | None = None
    memory: int = 0


def probe_gpu(timeout_s: float = 120.0) -> Gpu:
    """The machine's CUDA devices, asked of torch in a child process (no GPU: ``Gpu()``, also without torch)."""
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout_s,
                             check=True).stdout
        found = json.loads(out.strip().splitlines()[-1])
        return Gpu(int(found["count"]), found["name"], int(found["memory"]))
    except (subprocess.SubprocessError, OSError, ValueError, IndexError, KeyError) as exc:
        log.warning("no GPU found: the probe failed (%s)", exc)
        return Gpu()


@dataclass
class _Self:
    queues: list[str]
    hostname: str
    gpu: Gpu | None = None


_SELF: list[_Self] = []
# Held by a heartbeat while it writes and by the withdrawal: no beat after shutdown puts the row back.
_LOCK = threading.Lock()
_LEFT = threading.Event()


def configure(queues: list[str], hostname: str, gpu: Gpu) -> None:
    """Record what this worker process consumes and has (``worker.main.run_worker``, before Celery starts)."""
    _SELF[:] = [_Self(list(queues), hostname, gpu)]
    _LEFT.clear()


def queues_for(requested: list[str] | None, gpu: Gpu, settings: Settings | None = None) -> list[str]:
    """The queues a worker consumes: those asked for (default cpu and gpu), plus the CUDA queue with a GPU."""
    s = settings or get_settings()
    names = list(requested or [s.cpu_queue, s.gpu_queue])
    if gpu.count and s.cuda_queue not in names:
        names.append(s.cuda_queue)
    return names


def current(settings: Settings | None = None) -> Advert:
    """This worker's advertisement now (free memory read afresh each time)."""
    s = settings or get_settings()
    if not _SELF:  # started some other way than worker.main: the default queues and, not consuming the CUDA
        configure(queues_for(None, Gpu(), s), socket.gethostname(), Gpu())  # queue, no GPU to offer
    me = _SELF[0]
    gpu = me.gpu or Gpu()
    total = s.worker_memory_bytes or machine_memory_bytes()
    return Advert(id=f"{me.hostname}:{os.getpid()}", hostname=me.hostname, queues=me.queues, memory_total=total,
                  memory_free=min(total, machine_free_memory_bytes()), gpu_name=gpu.name, gpu_count=gpu.count,
                  gpu_memory=gpu.memory)


def beat(settings: Settings | None = None) -> Advert | None:
    """Write this worker's advertisement with a fresh heartbeat; returns it (None: the worker has left)."""
    s = settings or get_settings()
    with _LOCK:
        if _LEFT.is_set():
            return None
        advert = current(s)
        advertise(advert, s.worker_live_s)
        return advert


def leave() -> None:
    """Withdraw this worker's advertisement for good (warm shutdown): later heartbeats write nothing."""
    with _LOCK:
        _LEFT.set()
        if _SELF:
            withdraw(current().id)
