"""Start the real service for end-to-end tests: uvicorn and a Celery worker as subprocesses."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_in_thread(app: object) -> Iterator[str]:
    """``app`` served by uvicorn in a thread of this process (its settings, its monkeypatches); the base URL."""
    import threading

    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@dataclass
class LiveService:
    """A running API + worker pair sharing one MODELPRESS_* environment."""

    home: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    api: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    # The worker's own environment when it must share nothing with the API but the services (S3 runs).
    worker_env: dict[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, args: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.home / log_name, "ab")  # noqa: SIM115 (closed with the process)
        return subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def migrate(self) -> None:
        subprocess.run([sys.executable, "-c", "from migrations import upgrade; upgrade()"],
                       cwd=ROOT, env=self.env, check=True)

    def start_api(self) -> None:
        self.api = self._spawn(["-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port",
                                str(self.port), "--log-level", "warning"], "api.log")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.api.poll() is None, self.logs("api.log")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError("API did not start:\n" + self.logs("api.log"))

    def start_worker(self) -> subprocess.Popen[bytes]:
        queues = f"{self.env['MODELPRESS_CPU_QUEUE']},{self.env['MODELPRESS_GPU_QUEUE']}"
        self.worker = self._spawn(["-m", "worker.main", "--queues", queues, "--loglevel", "INFO"], "worker.log",
                                  self.worker_env)
        return self.worker

    def worker_children(self) -> list[psutil.Process]:
        """The worker's pool processes (the ones that run tasks)."""
        assert self.worker is not None
        return psutil.Process(self.worker.pid).children(recursive=True)

    def stop_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.worker.pid, signal.SIGKILL)
                self.worker.wait()

    def stop(self) -> None:
        self.stop_worker()
        if self.api is not None and self.api.poll() is None:
            self.api.terminate()
            try:
                self.api.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.api.kill()

    def logs(self, name: str) -> str:
        path = self.home / name
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def wait_job(self, client: httpx.Client, job_id: str, timeout: float = 180.0) -> dict:
        """Poll until the job is terminal; fail with the worker's log if it takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} not done: {job}\n{self.logs('worker.log')}")


def service_env(home: Path, run_id: str, **overrides: str) -> dict[str, str]:
    """A clean environment for the subprocesses: this interpreter's env minus other MODELPRESS_* values."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    env.update({
        "MODELPRESS_HOME": str(home),
        "MODELPRESS_CPU_QUEUE": f"cpu-{run_id}",
        "MODELPRESS_GPU_QUEUE": f"gpu-{run_id}",
        "MODELPRESS_JOB_LEASE_SECONDS": "4",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.update({f"MODELPRESS_{k.upper()}": v for k, v in overrides.items()})
    return env


@contextlib.contextmanager
def live_service(home: Path, env: dict[str, str], *, worker: bool = True,
                 worker_env: dict[str, str] | None = None) -> Iterator[LiveService]:
    """Migrate, start the API (and a worker, with ``worker_env`` when given), yield, then stop both."""
    home.mkdir(parents=True, exist_ok=True)
    svc = LiveService(home=home, env=env, worker_env=worker_env)
    svc.migrate()
    try:
        svc.start_api()
        if worker:
            svc.start_worker()
        yield svc
    finally:
        svc.stop()
