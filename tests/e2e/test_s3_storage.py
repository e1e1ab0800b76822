"""End to end on PostgreSQL + Redis + S3 (SeaweedFS): the API and the worker share no folder, only those three."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.e2e.harness import LiveService
from tests.factories import digits_split, train_digits_mlp_onnx, write_npz

pytestmark = pytest.mark.e2e


def _bucket_keys(svc: LiveService) -> set[str]:
    from storage.s3 import make_client

    env = svc.env
    client = make_client(env["AWS_ENDPOINT_URL"], access_key_id=env["AWS_ACCESS_KEY_ID"],
                         secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    bucket = env["MODELPRESS_STORAGE_URL"].removeprefix("s3://").split("/")[0]
    return {o["Key"].rsplit("/", 1)[-1] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


def test_a_job_on_s3_with_nothing_shared_but_the_services(distributed_s3: LiveService, tmp_path: Path) -> None:
    svc = distributed_s3
    model_path = tmp_path / "mlp.onnx"
    train_digits_mlp_onnx(model_path)
    name = onnx.load(str(model_path)).graph.input[0].name
    _, (x_ev, y_ev) = digits_split()
    write_npz(tmp_path / "eval.npz", x_ev, y_ev, name)
    assert svc.worker_env is not None
    api_home, worker_home = Path(svc.env["MODELPRESS_HOME"]), Path(svc.worker_env["MODELPRESS_HOME"])
    with httpx.Client(base_url=svc.url, timeout=30) as client:
        assert client.get("/readyz").json()["checks"]["storage"] == "ok"  # the bucket was created
        ids: dict[str, Any] = {}
        for kind, path, fmt in (("models", model_path, "onnx"), ("datasets", tmp_path / "eval.npz", "npz")):
            r = client.put(f"/v1/{kind}", params={"name": path.name, "format": fmt}, content=path.read_bytes())
            assert r.status_code == 201, r.text
            ids[kind] = r.json()
        assert {ids["models"]["sha256"], ids["datasets"]["sha256"]} <= _bucket_keys(svc)
        r = client.post("/v1/jobs", json={"model": ids["models"]["id"], "task": "image-classification",
                                          "data": {"eval": ids["datasets"]["id"]},
                                          "steps": [{"type": "quantize", "mode": "dynamic"}],
                                          "evaluate": {"latency": {"runs": 5, "warmup": 1}}})
        assert r.status_code == 202, r.text
        done = svc.wait_job(client, r.json()["id"])
        assert done["status"] == "succeeded", (done, svc.logs("worker.log"))
        arts = {a["name"]: a for a in done["result"]["artifacts"]}
        assert {a["sha256"] for a in arts.values()} <= _bucket_keys(svc)
        got = client.get(f"/v1/artifacts/{arts['model.onnx']['id']}/content")
        assert got.status_code == 200 and got.headers["etag"].strip('"') == arts["model.onnx"]["sha256"]
    out = tmp_path / "out.onnx"
    out.write_bytes(got.content)
    x = x_ev[:64].astype(np.float32)
    assert (_outputs(model_path, x).argmax(1) == _outputs(out, x).argmax(1)).mean() >= 0.95
    # The API kept no blob; the worker read its inputs through its own bounded cache and left no job files.
    assert [p for p in _files(api_home) if p.suffix not in (".log",)] == []
    cached = {p.name for p in _files(worker_home / "blob-cache") if p.parent.parent.parent.name == "blob-cache"}
    assert cached == {ids["models"]["sha256"], ids["datasets"]["sha256"]}
    assert _files(worker_home / "work") == [] and _files(worker_home / "storage") == []
