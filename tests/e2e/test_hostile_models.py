"""A model whose graph loops (almost) forever, on the live embedded service: refused at upload when its trip
count is a constant; otherwise its job is cancellable within seconds and fails with ``run_time_limit``
past the run cap, and the worker goes on to the next job. The same holds for a model that loops only on
its calibration samples (its evaluation passes): in static INT8 calibration and in auto_exclude's runs."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from tests.api import builders
from tests.conftest import RUN_ID
from tests.e2e.harness import LiveService, live_service, service_env
from tests.factories_onnx import INPUT, looping_model

pytestmark = pytest.mark.e2e
RUN_MAX_S = 6


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """API + one worker on the embedded defaults, with one model run capped at RUN_MAX_S seconds."""
    home = tmp_path_factory.mktemp("hostile")
    with live_service(home, service_env(home, RUN_ID, run_max_s=str(RUN_MAX_S))) as service:
        yield service


def _bytes(model: onnx.ModelProto) -> bytes:
    buf = io.BytesIO()
    onnx.save(model, buf)
    return buf.getvalue()


def _looping_job(client: httpx.Client) -> str:
    mdl = client.put("/v1/models", params={"format": "onnx"}, content=_bytes(looping_model(2**40, constant=False)))
    assert mdl.status_code in (200, 201), mdl.text  # the second test uploads the same bytes again
    data = builders.npz_bytes({INPUT: np.ones((8, 4), np.float32), "labels": np.zeros(8, np.int64)})
    ds = client.put("/v1/datasets", params={"format": "npz"}, content=data)
    job = client.post("/v1/jobs", json={"model": mdl.json()["id"], "data": {"eval": ds.json()["id"]},
                                        "steps": [{"type": "quantize", "mode": "dynamic"}],
                                        "evaluate": {"latency": {"runs": 2, "warmup": 1}}})
    assert job.status_code == 202, job.text
    return str(job.json()["id"])


def _wait_running(svc: LiveService, client: httpx.Client, job_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and "evaluat" in str(job["phase"]):
            return dict(job)
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.2)
    raise TimeoutError(svc.logs("worker.log"))


def test_a_constant_huge_loop_is_refused_at_upload(svc: LiveService) -> None:
    r = httpx.put(f"{svc.url}/v1/models", params={"format": "onnx"}, content=_bytes(looping_model(2**40)))
    assert r.status_code == 422 and r.json()["code"] == "invalid_model"
    assert "runs 1099511627776 times" in r.json()["detail"]
    assert httpx.get(f"{svc.url}/v1/models").json()["data"] == []


def test_cancelling_a_looping_job_ends_it_within_seconds(svc: LiveService) -> None:
    with httpx.Client(base_url=svc.url, timeout=30) as client:
        job_id = _looping_job(client)
        _wait_running(svc, client, job_id)
        time.sleep(1.0)  # inside the looping run
        asked = time.monotonic()
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        job = svc.wait_job(client, job_id, timeout=10)
        assert job["status"] == "cancelled" and time.monotonic() - asked <= 10


def test_a_looping_job_fails_with_run_time_limit_and_the_worker_moves_on(svc: LiveService, tmp_path: Path) -> None:
    with httpx.Client(base_url=svc.url, timeout=30) as client:
        job_id = _looping_job(client)
        _wait_running(svc, client, job_id)
        job = svc.wait_job(client, job_id, timeout=RUN_MAX_S + 20)
        assert job["status"] == "failed" and job["error"]["code"] == "run_time_limit", job["error"]
        assert f"MODELPRESS_RUN_MAX_S={RUN_MAX_S} s" in job["error"]["message"]
        # The worker is free again: a model that does not loop runs to the end.
        mdl = client.put("/v1/models", params={"format": "onnx"}, content=_bytes(looping_model(3, constant=False)))
        ds = client.put("/v1/datasets", params={"format": "npz"}, content=builders.npz_bytes(
            {INPUT: np.ones((8, 4), np.float32), "labels": np.zeros(8, np.int64)}))
        ok = client.post("/v1/jobs", json={"model": mdl.json()["id"], "data": {"eval": ds.json()["id"]},
                                           "steps": [{"type": "quantize", "mode": "dynamic"}],
                                           "evaluate": {"latency": {"runs": 2, "warmup": 1}}}).json()
        assert svc.wait_job(client, ok["id"], timeout=120)["status"] == "succeeded"


def _looping_on_calibration_job(client: httpx.Client, step: dict[str, object]) -> str:
    """A job whose input evaluates at once (all-zero eval samples) and loops on its calibration samples."""
    mdl = client.put("/v1/models", params={"format": "onnx"},
                     content=_bytes(looping_model(2**40, on_data=True)))
    assert mdl.status_code in (200, 201), mdl.text
    zeros, ones = np.zeros((8, 4), np.float32), np.ones((8, 4), np.float32)
    ids = [client.put("/v1/datasets", params={"format": "npz"},
                      content=builders.npz_bytes({INPUT: x, "labels": np.zeros(8, np.int64)})).json()["id"]
           for x in (zeros, ones)]
    job = client.post("/v1/jobs", json={"model": mdl.json()["id"], "data": {"eval": ids[0], "calibration": ids[1]},
                                        "steps": [step], "evaluate": {"latency": {"runs": 2, "warmup": 1}}})
    assert job.status_code == 202, job.text
    return str(job.json()["id"])


def test_cancelling_a_job_whose_static_calibration_loops_ends_it_within_seconds(svc: LiveService) -> None:
    with httpx.Client(base_url=svc.url, timeout=30) as client:
        job_id = _looping_on_calibration_job(client, {"type": "quantize", "mode": "static"})
        deadline, step_began = time.monotonic() + 90, None
        # "calibrating" (a progress write, skipped when it follows the step's start within 0.5 s, as on a
        # worker that has the quantizer loaded), or 3 s into the quantize step: inside the looping run.
        while "calibrating" not in str((job := client.get(f"/v1/jobs/{job_id}").json())["phase"]):
            assert job["status"] in ("queued", "running") and time.monotonic() < deadline, (job, svc.logs("worker.log"))
            if step_began is None and any(w in str(job["phase"]) for w in ("quantiz", "preprocess")):
                step_began = time.monotonic()
            if step_began is not None and time.monotonic() - step_began >= 3:
                break
            time.sleep(0.2)
        time.sleep(1.0)
        asked = time.monotonic()
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        job = svc.wait_job(client, job_id, timeout=10)
        assert job["status"] == "cancelled" and time.monotonic() - asked <= 10


def test_a_job_whose_auto_exclude_runs_loop_fails_with_run_time_limit(svc: LiveService) -> None:
    with httpx.Client(base_url=svc.url, timeout=30) as client:
        job_id = _looping_on_calibration_job(client, {"type": "quantize", "mode": "static",
                                                      "auto_exclude": {"min_fidelity": 0.99, "samples": 8}})
        job = svc.wait_job(client, job_id, timeout=RUN_MAX_S + 90)
        assert job["status"] == "failed" and job["error"]["code"] == "run_time_limit", job["error"]
        assert "(auto_exclude)" in job["error"]["message"] and f"MODELPRESS_RUN_MAX_S={RUN_MAX_S} s" in job["error"]["message"]
