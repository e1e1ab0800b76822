"""Workers advertise themselves, and the API plans by them: on the embedded stack (SQLite database and broker)
a real worker process registers its queues, memory and GPU; admission plans against that worker's memory,
refuses training a model too large for a CPU while no GPU worker is live, and stops counting the worker once it
has shut down."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from sqlalchemy import create_engine, text

from tests.conftest import RUN_ID
from tests.e2e.harness import LiveService, live_service, service_env
from tests.factories_lm import text_rows, tiny_lm_archive, write_jsonl

WORKER_MEMORY = 1_000_000  # what the worker advertises (its setting): far less than the tiny Llama's in-memory job


@pytest.fixture(scope="module")
def fleet_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    home = tmp_path_factory.mktemp("fleet")
    env = service_env(home, RUN_ID, cpu_train_max_params="1000", worker_heartbeat_s="1")
    worker_env = {**env, "MODELPRESS_WORKER_MEMORY_BYTES": str(WORKER_MEMORY)}
    with live_service(home, env, worker_env=worker_env) as svc:
        yield svc


def _workers(svc: LiveService) -> list[dict[str, Any]]:
    engine = create_engine(f"sqlite:///{svc.home / 'modelpress.db'}")
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text("SELECT * FROM workers"))]
    finally:
        engine.dispose()


def _registered(svc: LiveService, timeout: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rows := _workers(svc):
            return rows[0]
        assert svc.worker is not None and svc.worker.poll() is None, svc.logs("worker.log")
        time.sleep(0.3)
    raise TimeoutError("the worker never advertised itself:\n" + svc.logs("worker.log"))


def test_admission_follows_the_live_workers(fleet_stack: LiveService, tmp_path: Path) -> None:
    svc = fleet_stack
    me = _registered(svc)
    assert me["memory_total"] == WORKER_MEMORY and me["gpu_count"] == torch.cuda.device_count() == 0
    assert me["gpu_name"] is None and me["id"].startswith("modelpress-")
    assert json.loads(me["queues"]) == [svc.env["MODELPRESS_CPU_QUEUE"], svc.env["MODELPRESS_GPU_QUEUE"]]

    archive = tiny_lm_archive(tmp_path, "llama", layers=1)
    rows = write_jsonl(tmp_path / "train.jsonl", text_rows(8))
    with httpx.Client(base_url=svc.url, timeout=60) as client:
        model = client.put("/v1/models", params={"format": "hf"}, content=archive.read_bytes()).json()["id"]
        train = client.put("/v1/datasets", params={"format": "text"}, content=rows.read_bytes()).json()["id"]
        dynamic = {"model": model, "task": "text-generation", "steps": [{"type": "quantize", "mode": "dynamic"}]}

        r = client.post("/v1/jobs", json=dynamic)
        assert r.status_code == 422 and r.json()["code"] == "job_too_large", r.text
        err = r.json()["errors"][0]
        assert err["worker_memory_bytes"] == WORKER_MEMORY and err["memory_basis"] == f"largest live worker {me['id']}"

        lora = {"model": model, "task": "text-generation", "data": {"train": train},
                "steps": [{"type": "finetune", "mode": "lora"}]}
        r = client.post("/v1/jobs", json=lora)
        assert r.status_code == 422 and r.json()["code"] == "needs_gpu_worker", r.text
        assert "no live worker has a GPU" in r.json()["detail"]

        svc.stop_worker()  # a warm shutdown withdraws the advertisement
        assert _workers(svc) == []
        r = client.post("/v1/jobs", json=dynamic)
        assert r.status_code == 202, r.text  # planned against the API's machine again: the tiny model fits
