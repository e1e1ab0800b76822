"""Submit-time convertibility: a torch step on an ONNX upload whose operators onnx2torch cannot convert is a 422."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests import factories_onnx


@pytest.fixture(autouse=True)
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import worker.celery_app

    calls: list[str] = []
    monkeypatch.setattr(worker.celery_app, "enqueue_job", lambda job_id, queue: calls.append(job_id))
    return calls


def _upload(client: TestClient, tmp_path: Path, **kw: bool) -> str:
    src = factories_onnx.opset20_cnn(tmp_path / "src", **kw)
    packed = factories_onnx.archive_of(src, tmp_path / "m.zip")
    r = client.put("/v1/models", params={"format": "onnx"}, content=packed.read_bytes())
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_an_unconvertible_operator_is_named_with_what_to_do(
    client: TestClient, tmp_path: Path, enqueued: list[str]
) -> None:
    model = _upload(client, tmp_path, mish=True)
    spec = {"model": model, "steps": [{"type": "prune", "ratio": 0.25}, {"type": "prune", "ratio": 0.5}]}
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json"), r.text
    error = r.json()["errors"][0]
    assert error["field"] == "steps.0" and r.json()["detail"].startswith("steps.0: the model's ONNX graph")
    assert "(opset 20) uses Mish" in error["message"] and "'prune' step" in error["message"]
    assert "re-export it without those operators" in error["message"]  # no opset has a Mish converter
    assert enqueued == []
    quantize_only = client.post("/v1/jobs", json={"model": model, "steps": [{"type": "quantize"}]})
    assert quantize_only.status_code == 202, quantize_only.text


def test_todays_default_export_of_a_cnn_is_accepted_for_pruning(
    client: TestClient, tmp_path: Path, enqueued: list[str]
) -> None:
    model = _upload(client, tmp_path)
    r = client.post("/v1/jobs", json={"model": model, "steps": [{"type": "prune", "ratio": 0.5}]})
    assert r.status_code == 202, r.text
    assert len(enqueued) == 1


def test_a_distill_teacher_that_cannot_be_converted_is_named(
    client: TestClient, tmp_path: Path, enqueued: list[str]
) -> None:
    from tests.api import builders

    student = _upload(client, tmp_path / "s")
    teacher = _upload(client, tmp_path / "t", mish=True)
    train = builders.insert_dataset(meta={"num_samples": 8, "classes": None,
                                          "fields": {"input": {"dtype": "float32", "shape": [8, 1, 8, 8]}}})
    spec = {"model": student, "data": {"train": train}, "steps": [{"type": "distill", "teacher": teacher}]}
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 422, r.text
    error = r.json()["errors"][0]
    assert error["field"] == "steps.0.teacher" and "uses Mish" in error["message"]
    assert "distillation (as the teacher)" in error["message"] and enqueued == []
