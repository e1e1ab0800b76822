"""Fault tests: a broker restarted without persistence under queued and running jobs, and an API process
SIGKILLed in the middle of an upload. Each starts its own servers (its own Redis on a free port)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis

from tests.conftest import PG_ADMIN_DSN, RUN_ID, _sqlalchemy_url
from tests.e2e.harness import free_port, live_service, service_env
from tests.e2e.test_service import _long_training_spec, _submit, _upload, _wait_phase, assets  # noqa: F401

pytestmark = pytest.mark.e2e


class RedisServer:
    """A redis-server of this test's own, without persistence, that can be killed and started again."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def database() -> Iterator[str]:
    name = f"mp_faults_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _sqlalchemy_url(f"{PG_ADMIN_DSN.rpartition('/')[0]}/{name}")
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _status_events(client: httpx.Client, job_id: str, status: str) -> int:
    events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return sum(1 for e in events if e["kind"] == "status" and e["data"].get("status") == status)


def test_broker_restart_loses_no_job_and_runs_none_twice(
    tmp_path: Path, database: str, assets: dict[str, Path]  # noqa: F811
) -> None:
    broker = RedisServer(tmp_path)
    broker.start()
    home = tmp_path / "home"
    env = service_env(home, f"{RUN_ID}-{uuid.uuid4().hex[:6]}", database_url=database, broker_url=broker.url,
                      reconcile_interval_s="1", reconcile_queued_after_s="5", gc_interval_s="0")
    dead_attempt = home / "work" / "job_killed_earlier" / "attempt-1"  # a killed worker's work folder
    dead_attempt.mkdir(parents=True)
    (dead_attempt / "model.onnx").write_bytes(b"m" * 4096)
    old = time.time() - 3600
    os.utime(dead_attempt, (old, old))
    try:
        with live_service(home, env) as svc, httpx.Client(base_url=svc.url, timeout=30) as client:
            deadline = time.monotonic() + 30
            while dead_attempt.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not dead_attempt.exists(), svc.logs("worker.log")  # removed when the worker started
            model = _upload(client, "models", assets["model"], "onnx")
            train = _upload(client, "datasets", assets["train"], "npz")
            evald = _upload(client, "datasets", assets["eval"], "npz")
            running = _submit(client, _long_training_spec(model["id"], train["id"], evald["id"], epochs=8))["id"]
            _wait_phase(svc, client, running, "epoch")
            quick = {"model": model["id"], "task": "image-classification", "data": {"eval": evald["id"]},
                     "steps": [{"type": "quantize", "mode": "dynamic"}], "evaluate": {"latency": {"runs": 3, "warmup": 1}}}
            queued = [_submit(client, quick | {"seed": i})["id"] for i in range(3)]
            assert all(client.get(f"/v1/jobs/{j}").json()["status"] == "queued" for j in queued)
            broker.kill()  # no persistence: the three queued messages and the running one's are gone
            time.sleep(1.0)
            broker.start()
            jobs: dict[str, dict[str, Any]] = {j: svc.wait_job(client, j, timeout=300) for j in [running, *queued]}
            for job_id, job in jobs.items():
                assert job["status"] == "succeeded", (job, svc.logs("worker.log"))
                assert _status_events(client, job_id, "succeeded") == 1
                assert [a["name"] for a in job["result"]["artifacts"]].count("model.onnx") == 1
            assert all(jobs[j]["attempt"] == 1 for j in queued)  # re-sent, not re-run
            assert jobs[running]["attempt"] <= 2
            events = [e["message"] for j in queued
                      for e in client.get(f"/v1/jobs/{j}/events", params={"limit": 1000}).json()["data"]]
            assert any(m.startswith("re-enqueued") for m in events), svc.logs("worker.log")
    finally:
        broker.kill()


def test_api_killed_mid_upload_leaves_no_record_and_its_bytes_go_at_next_start(
    tmp_path: Path, database: str, redis_url: str
) -> None:
    home = tmp_path / "home"
    # The default grace (60 s) for leftovers: a restart seconds later still removes what the killed API left.
    env = service_env(home, f"{RUN_ID}-{uuid.uuid4().hex[:6]}", database_url=database, broker_url=redis_url)
    with live_service(home, env, worker=False) as svc:
        staging = home / "storage" / "tmp"
        sent = 0
        killed = threading.Event()

        def body() -> Iterator[bytes]:
            nonlocal sent
            for _ in range(64):  # 64 MiB announced by nothing (chunked); the API dies after a few
                sent += 1
                yield b"\0" * (1024 * 1024)
                if sent == 8:
                    killed.wait(30)  # the API is killed while it waits for the rest

        def staged_bytes() -> int:
            return sum(p.stat().st_size for p in staging.glob("up-*"))

        errors: list[BaseException] = []

        def upload() -> None:
            try:
                httpx.put(f"{svc.url}/v1/models", params={"format": "onnx"}, content=body(), timeout=60)
            except httpx.HTTPError as exc:
                errors.append(exc)

        thread = threading.Thread(target=upload, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while staged_bytes() < 4 * 1024 * 1024 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert staged_bytes() >= 4 * 1024 * 1024, svc.logs("api.log")
        assert svc.api is not None
        svc.api.kill()  # SIGKILL: no cleanup runs
        svc.api.wait()
        killed.set()
        thread.join(40)
        assert errors, "the upload should have failed with the API gone"
        leftovers = list(staging.glob("up-*"))
        assert leftovers and staged_bytes() >= 4 * 1024 * 1024  # what no restart used to remove
        svc.start_api()
        assert list(staging.glob("up-*")) == []
        with httpx.Client(base_url=svc.url, timeout=30) as client:
            assert client.get("/v1/models").json()["data"] == []
