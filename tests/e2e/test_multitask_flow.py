"""End to end over HTTP on Redis + PostgreSQL (a shared local store: the S3 stack's jobs are
tests/e2e/test_service.py's and test_s3_storage.py's): a digits CNN uploaded as ONNX and two tasks'
npz datasets; a multi-task finetune with no top-level data comes back as one ONNX file with one output per task
(labels in its metadata), each task's before/after in the report and a Tasks section on the report page."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests import factories_train as f
from tests.e2e.harness import LiveService

pytestmark = pytest.mark.e2e


def _upload(client: httpx.Client, kind: str, path: Path, fmt: str) -> str:
    r = client.put(f"/v1/{kind}", params={"name": path.name, "format": fmt}, content=path.read_bytes())
    assert r.status_code in (200, 201), r.text
    return str(r.json()["id"])


def test_multitask_finetune_over_http(distributed: LiveService, tmp_path: Path) -> None:
    model_path, input_acc = f.cnn_onnx()
    train, evald = f.digits()
    xs, ys, xe, ye = train.inputs["input"], train.labels, evald.inputs["input"], evald.labels
    assert ys is not None and ye is not None
    files = {}
    for name, (y, yv) in {"digit": (ys, ye), "parity": (ys % 2, ye % 2)}.items():
        for role, (x, lab) in {"train": (xs, y), "eval": (xe, yv)}.items():
            np.savez(tmp_path / f"{name}-{role}.npz", input=x, labels=lab)
            files[(name, role)] = tmp_path / f"{name}-{role}.npz"
    with httpx.Client(base_url=distributed.url, timeout=30) as client:
        model = _upload(client, "models", model_path, "onnx")
        ids = {k: _upload(client, "datasets", p, "npz") for k, p in files.items()}
        spec = {
            "model": model, "task": "image-classification",
            "steps": [{"type": "finetune", "epochs": 3, "batch_size": 64, "lr": 3e-3, "tasks": [
                {"name": n, "data": {"train": ids[(n, "train")], "eval": ids[(n, "eval")]}}
                for n in ("digit", "parity")]}],
            "evaluate": {"latency": {"runs": 5, "warmup": 1}},
        }
        r = client.post("/v1/jobs", json=spec)
        assert r.status_code == 202, r.text
        job = distributed.wait_job(client, r.json()["id"], timeout=240)
        assert job["status"] == "succeeded", job
        arts = {x["name"]: x for x in job["result"]["artifacts"]}
        out = tmp_path / "out.onnx"
        out.write_bytes(client.get(f"/v1/artifacts/{arts['model.onnx']['id']}/content").content)
        page = client.get(f"/v1/jobs/{job['id']}/report.html")
        assert page.status_code == 200 and '<section id="tasks">' in page.text

    rows = {r["task"]: r for r in job["result"]["report"]["steps"][0]["metrics"]["multitask"]["tasks"]}
    # parity is binary (chance 0.5): 0.8 says the new head learned it on the shared backbone (0.83-0.96 seen)
    assert rows["digit"]["after"] >= input_acc - 0.05 and rows["parity"]["after"] >= 0.8
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits_digit", "logits_parity"]
    meta = sess.get_modelmeta().custom_metadata_map
    assert [t["labels"] for t in json.loads(meta["modelpress.tasks"])] == [[str(i) for i in range(10)], ["0", "1"]]
    assert "modelpress.labels" not in meta
    parity = sess.run(["logits_parity"], {"input": xe})[0]
    assert float((parity.argmax(1) == ye % 2).mean()) == pytest.approx(rows["parity"]["after"])
