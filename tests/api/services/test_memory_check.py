"""Admission by memory: ``POST /v1/jobs`` refuses a job over an LLM that the workers' memory cannot hold
(422 ``job_too_large``, with the estimate and what would fit) and accepts the streamed form of it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from models import memory_fit
from models.db import session_scope
from models.tables import Job


@pytest.fixture(autouse=True)
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import worker.celery_app

    calls: list[str] = []
    monkeypatch.setattr(worker.celery_app, "enqueue_job", lambda job_id, queue: calls.append(job_id))
    return calls


@pytest.fixture(scope="module")
def lm_zips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    from tests import factories_lm as lm
    from tests.factories_train import zip_dir

    tmp = tmp_path_factory.mktemp("lms")
    dirs = {"llama": lm.tiny_lm_dir(tmp / "llama", layers=1), "gpt2": lm.tiny_lm_dir(tmp / "gpt2", kind="gpt2", layers=1)}
    return {k: zip_dir(d, tmp / f"{k}.zip").read_bytes() for k, d in dirs.items()}


@pytest.fixture
def small_workers(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Workers with 2 MB: the tiny Llama (~0.1 M parameters) does not fit in memory, but streamed it does."""
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_WORKER_MEMORY_BYTES", str(2_000_000))
    monkeypatch.setattr(memory_fit, "STREAMED_FIXED_BYTES", 0)
    get_settings.cache_clear()
    yield 2_000_000
    get_settings.cache_clear()


def _upload(client: TestClient, data: bytes) -> dict[str, Any]:
    r = client.put("/v1/models", params={"format": "hf"}, content=data)
    assert r.status_code == 201, r.text
    return dict(r.json())


def _jobs() -> int:
    with session_scope() as s:
        return int(s.scalar(select(func.count()).select_from(Job)) or 0)


def _too_large(client: TestClient, spec: dict[str, Any]) -> dict[str, Any]:
    before = _jobs()
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = dict(r.json())
    assert problem["code"] == "job_too_large" and problem["errors"][0]["field"] == "steps"
    assert _jobs() == before  # nothing queued
    return problem


def test_jobs_that_cannot_fit_are_refused_with_what_would(
    client: TestClient, lm_zips: dict[str, bytes], small_workers: int, enqueued: list[str]
) -> None:
    llama = _upload(client, lm_zips["llama"])
    params = llama["meta"]["parameters"] if "meta" in llama else None
    base = {"model": llama["id"], "task": "text-generation"}

    # int4 RTN as the only step is streamed: accepted
    r = client.post("/v1/jobs", json={**base, "steps": [{"type": "quantize", "mode": "int4"}]})
    assert r.status_code == 202, r.text
    assert len(enqueued) == 1

    # dynamic INT8 needs the in-memory export: 18 bytes per parameter, refused, pointing at int4
    p = _too_large(client, {**base, "steps": [{"type": "quantize", "mode": "dynamic"}]})
    assert "18 bytes per parameter" in p["detail"] and "workers have 0 GB" in p["detail"]
    assert "What fits: a single step quantize {mode: int4}" in p["detail"]
    err = p["errors"][0]
    assert err["path"] == "in_memory" and err["worker_memory_bytes"] == small_workers
    assert err["estimate_bytes"] > memory_fit.MEMORY_SHARE * small_workers
    if params is not None:
        assert err["estimate_bytes"] == params * memory_fit.IN_MEMORY_BYTES_PER_PARAM

    # training a model this large on a CPU worker: refused, saying so
    rows = b'{"text": "a licence paragraph to train on"}\n' * 4
    train = client.put("/v1/datasets", params={"format": "text"}, content=rows).json()["id"]
    p = _too_large(client, {**base, "steps": [{"type": "finetune", "mode": "full"}], "data": {"train": train}})
    assert "a CPU worker cannot train a model this large" in p["detail"] and p["errors"][0]["path"] == "training"


def test_a_model_the_writer_does_not_stream_is_told_the_largest_that_fits(
    client: TestClient, lm_zips: dict[str, bytes], small_workers: int
) -> None:
    gpt2 = _upload(client, lm_zips["gpt2"])
    p = _too_large(client, {"model": gpt2["id"], "task": "text-generation",
                            "steps": [{"type": "quantize", "mode": "int4"}]})
    assert "GPT2LMHeadModel is not streamed" in p["detail"] and "the largest model this job fits" in p["detail"]


def test_with_the_default_memory_small_models_pass(client: TestClient, lm_zips: dict[str, bytes]) -> None:
    llama = _upload(client, lm_zips["llama"])
    r = client.post("/v1/jobs", json={"model": llama["id"], "task": "text-generation",
                                      "steps": [{"type": "quantize", "mode": "dynamic"}]})
    assert r.status_code == 202, r.text


def _advert(name: str, memory: int, gpu: int = 0, queues: tuple[str, ...] = ("cpu", "gpu", "cuda"),
            seconds_ago: float = 0) -> None:
    from datetime import timedelta

    from models.tables import utcnow
    from models.workers import Advert, advertise

    advertise(Advert(id=f"{name}:1", hostname=name, queues=list(queues), memory_total=memory, memory_free=memory,
                     gpu_name="NVIDIA H100" if gpu else None, gpu_count=1 if gpu else 0, gpu_memory=gpu),
              live_s=60, now=utcnow() - timedelta(seconds=seconds_ago))


@pytest.fixture
def large_from_1000_params(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The tiny Llama counts as too large for a CPU worker to train."""
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_CPU_TRAIN_MAX_PARAMS", "1000")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_admission_plans_against_the_largest_live_worker(
    client: TestClient, lm_zips: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory_fit, "STREAMED_FIXED_BYTES", 0)
    llama = _upload(client, lm_zips["llama"])
    spec = {"model": llama["id"], "task": "text-generation", "steps": [{"type": "quantize", "mode": "dynamic"}]}
    _advert("small", 1_000_000)
    _advert("smaller", 500_000)
    _advert("was-big", 10**12, seconds_ago=120)  # silent past the live window: not counted
    err = _too_large(client, spec)["errors"][0]
    assert err["worker_memory_bytes"] == 1_000_000 and err["memory_basis"] == "largest live worker small:1"
    _advert("big", 64 * 10**9)
    assert client.post("/v1/jobs", json=spec).status_code == 202


def test_training_a_large_model_goes_to_a_live_gpu_worker_or_is_refused(
    client: TestClient, lm_zips: dict[str, bytes], large_from_1000_params: None
) -> None:
    llama = _upload(client, lm_zips["llama"])
    rows = b'{"text": "a licence paragraph to train on"}\n' * 4
    train = client.put("/v1/datasets", params={"format": "text"}, content=rows).json()["id"]
    lora = {"model": llama["id"], "task": "text-generation", "data": {"train": train},
            "steps": [{"type": "finetune", "mode": "lora"}]}

    def refused(spec: dict[str, Any], code: str) -> dict[str, Any]:
        r = client.post("/v1/jobs", json=spec)
        assert r.status_code == 422 and r.json()["code"] == code, r.text
        return dict(r.json())

    _advert("cpu-only", 64 * 10**9)
    _advert("gpu-gone", 64 * 10**9, gpu=80 * 10**9, seconds_ago=120)
    p = refused(lora, "needs_gpu_worker")
    assert "a CPU worker does not train a model this large" in p["detail"] and "the limit is 0.00 B" in p["detail"]
    assert "no live worker has a GPU" in p["detail"] and "What fits: a single step quantize {mode: int4}" in p["detail"]
    assert p["errors"][0]["cpu_train_max_params"] == 1000 and p["errors"][0]["gpu_workers"] == 0

    _advert("gpu-not-cuda", 64 * 10**9, gpu=80 * 10**9, queues=("cpu", "gpu"))  # does not consume the cuda queue
    refused(lora, "needs_gpu_worker")

    _advert("gpu-tiny", 64 * 10**9, gpu=10**9)  # 0.6 GB plannable, under the 2 GiB a CUDA job plans at least
    p = refused({**lora, "steps": [{"type": "finetune", "mode": "full"}]}, "job_too_large")
    assert "needs about 2 GB of GPU memory" in p["detail"] and "LoRA (mode lora" in p["detail"]
    assert "NVIDIA H100 on gpu-tiny:1" in p["detail"]

    _advert("gpu-no-ram", 1000, gpu=80 * 10**9)  # the GPU fits; its RAM cannot hold the export after training
    p = refused(lora, "job_too_large")
    assert "exported and evaluated in the worker's RAM" in p["detail"] and "gpu-no-ram:1" in p["detail"]

    _advert("gpu-h100", 64 * 10**9, gpu=80 * 10**9)
    refused({**lora, "queue": "cpu"}, "needs_gpu_worker")
    r = client.post("/v1/jobs", json=lora)
    assert r.status_code == 202, r.text
    job = client.get(r.headers["Location"]).json()
    assert job["queue"] == "cuda"
    events = client.get(f"/v1/jobs/{job['id']}/events").json()
    assert "queued for a GPU worker" in str(events)
