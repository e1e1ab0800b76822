"""``modelpress serve``: migrate, then run the API with an embedded worker process beside it."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys

from models.settings import get_settings

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(parent: int) -> None:
    """In the worker child, before exec: ask Linux for a SIGTERM (a warm shutdown) when ``parent`` dies, however
    it dies (a SIGKILLed ``serve`` would otherwise leave its worker running under PID 1); no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def serve(host: str = "127.0.0.1", port: int = 8000, with_worker: bool = True) -> None:
    """Run the API in the foreground (uvicorn) and, by default, one worker subprocess on all queues."""
    import uvicorn

    from migrations import upgrade

    settings = get_settings()
    upgrade()
    worker: subprocess.Popen[bytes] | None = None
    if with_worker:
        queues = f"{settings.cpu_queue},{settings.gpu_queue}"
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker.main", "--queues", queues],
            env={**os.environ, "MODELPRESS_HOME": str(settings.home)},
            preexec_fn=functools.partial(_die_with, os.getpid()),  # runs before uvicorn starts any thread
        )
    # uvicorn re-raises the SIGTERM it caught once it has shut down; with the default handler that would
    # kill this process before the `finally` below stops the worker. A Python handler lets it return.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        print(f"modelpress: API on http://{host}:{port}  (home: {settings.home})", flush=True)
        uvicorn.run("api.main:app", host=host, port=port, log_level="info")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
