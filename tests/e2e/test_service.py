"""End to end over HTTP: uvicorn + a real Celery worker, on the embedded defaults, on Redis + PostgreSQL, and on
Redis + PostgreSQL + S3 with nothing else shared between API and worker (every ``stack`` test runs on both)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.e2e.harness import LiveService
from tests.factories import digits_split, train_digits_mlp_onnx, write_npz

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained digits MLP as ONNX, and eval/calibration/train npz files named after its input."""
    d = tmp_path_factory.mktemp("assets")
    model = d / "mlp.onnx"
    train_digits_mlp_onnx(model)
    name = onnx.load(str(model)).graph.input[0].name
    (x_tr, y_tr), (x_ev, y_ev) = digits_split()
    write_npz(d / "train.npz", x_tr, y_tr, name)
    write_npz(d / "eval.npz", x_ev, y_ev, name)
    write_npz(d / "calib.npz", x_tr[:128], None, name)
    return {"model": model, "train": d / "train.npz", "eval": d / "eval.npz", "calib": d / "calib.npz"}


def _upload(client: httpx.Client, kind: str, path: Path, fmt: str) -> dict[str, Any]:
    r = client.put(f"/v1/{kind}", params={"name": path.name, "format": fmt}, content=path.read_bytes())
    assert r.status_code in (200, 201), r.text
    return r.json()


def _submit(client: httpx.Client, spec: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    assert r.headers["location"].endswith(r.json()["id"])
    return r.json()


def _run_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


def _download_model(client: httpx.Client, job: dict[str, Any], dest: Path) -> Path:
    arts = {a["name"]: a for a in job["result"]["artifacts"]}
    art = arts["model.onnx"]
    r = client.get(f"/v1/artifacts/{art['id']}/content")
    assert r.status_code == 200
    assert r.headers["etag"].strip('"') == art["sha256"]
    dest.write_bytes(r.content)
    return dest


@pytest.mark.parametrize("service", ["embedded", "distributed", "distributed_s3"])
def test_dynamic_quantization_round_trip(
    service: str, request: pytest.FixtureRequest, assets: dict[str, Path], tmp_path: Path
) -> None:
    svc: LiveService = request.getfixturevalue(service)
    with httpx.Client(base_url=svc.url, timeout=30) as client:
        model = _upload(client, "models", assets["model"], "onnx")
        evald = _upload(client, "datasets", assets["eval"], "npz")
        job = _submit(client, {"model": model["id"], "task": "image-classification", "data": {"eval": evald["id"]},
                               "steps": [{"type": "quantize", "mode": "dynamic"}],
                               "evaluate": {"latency": {"runs": 10, "warmup": 2}}})
        done = svc.wait_job(client, job["id"])
        assert done["status"] == "succeeded", done
        assert done["progress"]["percent"] == pytest.approx(100.0)
        assert done["progress"]["step"] == done["progress"]["steps"] == 3 and done["phase"] == "succeeded"
        report = done["result"]["report"]
        assert report["output"]["size_bytes"] < report["input"]["size_bytes"]
        assert report["input"]["accuracy"] > 0.85
        assert abs(report["output"]["accuracy"] - report["input"]["accuracy"]) <= 0.02
        out = _download_model(client, done, tmp_path / "out.onnx")
        x = np.load(assets["eval"])[model["inputs"][0]["name"]][:64]
        ref, got = _run_outputs(assets["model"], x), _run_outputs(out, x)
        # Dynamic INT8 keeps the decision and stays close in value.
        assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.95
        assert np.abs(ref - got).max() < 0.5 * np.abs(ref).max()
        kinds = [e["kind"] for e in client.get(f"/v1/jobs/{job['id']}/events").json()["data"]]
        assert kinds[0] == "status" and kinds[-1] == "status" and "phase" in kinds


def test_static_quantization(
    stack: LiveService, assets: dict[str, Path], tmp_path: Path
) -> None:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        model = _upload(client, "models", assets["model"], "onnx")
        evald = _upload(client, "datasets", assets["eval"], "npz")
        calib = _upload(client, "datasets", assets["calib"], "npz")
        job = _submit(client, {"model": model["id"], "data": {"eval": evald["id"], "calibration": calib["id"]},
                               "steps": [{"type": "quantize", "mode": "static",
                                          "calibration": {"method": "minmax", "samples": 128}}],
                               "evaluate": {"latency": {"runs": 5, "warmup": 1}}})
        done = stack.wait_job(client, job["id"])
        assert done["status"] == "succeeded", done
        out = _download_model(client, done, tmp_path / "static.onnx")
        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
        x = np.load(assets["eval"])[model["inputs"][0]["name"]][:64]
        assert (_run_outputs(assets["model"], x).argmax(1) == _run_outputs(out, x).argmax(1)).mean() >= 0.9


def _unconvertible_onnx(path: Path) -> None:
    """A valid ONNX model that passes the submit-time operator check (Pad-19 converts) but whose ``Pad`` uses
    ``mode='wrap'``, which torch cannot express: the conversion fails in the worker, inside the step."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32), "w")
    pads = numpy_helper.from_array(np.array([0, 1, 0, 1], dtype=np.int64), "pads")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("Pad", ["h", "pads"], ["y"], mode="wrap")],
        "unconvertible",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 12])],
        [w, pads],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))


def test_failing_step_names_the_step(stack: LiveService, assets: dict[str, Path], tmp_path: Path) -> None:
    _unconvertible_onnx(tmp_path / "odd.onnx")
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        model = _upload(client, "models", tmp_path / "odd.onnx", "onnx")
        x = np.random.default_rng(0).normal(size=(32, 64)).astype(np.float32)
        np.savez(tmp_path / "odd.npz", x=x)
        evald = _upload(client, "datasets", tmp_path / "odd.npz", "npz")
        job = _submit(client, {"model": model["id"], "data": {"eval": evald["id"]},
                               "steps": [{"type": "prune", "method": "structured", "ratio": 0.5}]})
        done = stack.wait_job(client, job["id"])
        assert done["status"] == "failed"
        assert done["error"]["step"].startswith("steps[0] prune"), done["error"]
        assert "Pad with mode='wrap'" in done["error"]["message"], done["error"]
        assert done["result"] is None or not done["result"].get("artifacts")


def test_cancel_a_queued_job(stack: LiveService, assets: dict[str, Path]) -> None:
    stack.stop_worker()
    try:
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            model = _upload(client, "models", assets["model"], "onnx")
            job = _submit(client, {"model": model["id"], "steps": [{"type": "quantize"}]})
            r = client.post(f"/v1/jobs/{job['id']}/cancel")
            assert r.status_code in (200, 202), r.text
            assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
            again = client.post(f"/v1/jobs/{job['id']}/cancel")
            assert again.status_code == 409 and again.json()["code"] == "job_terminal"
    finally:
        stack.start_worker()
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        time.sleep(3)  # the worker receives the task and must leave the cancelled job alone
        final = client.get(f"/v1/jobs/{job['id']}").json()
        assert final["status"] == "cancelled" and final["attempt"] == 0


def _long_training_spec(model_id: str, train_id: str, eval_id: str, epochs: int) -> dict[str, Any]:
    return {"model": model_id, "task": "image-classification",
            "data": {"train": train_id, "eval": eval_id},
            "steps": [{"type": "finetune", "mode": "full", "epochs": epochs, "batch_size": 8, "lr": 1e-4}],
            "evaluate": {"latency": {"runs": 5, "warmup": 1}}}


def _wait_phase(svc: LiveService, client: httpx.Client, job_id: str, word: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if word in job["phase"]:
            return
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.2)
    raise TimeoutError(f"phase never showed {word!r}\n{svc.logs('worker.log')}")


def _training_job_in_its_first_epoch(
    svc: LiveService, client: httpx.Client, assets: dict[str, Path], epochs: int
) -> dict[str, Any]:
    """Upload the MLP and its data, submit a fine-tune of ``epochs`` epochs, wait until it is training."""
    model = _upload(client, "models", assets["model"], "onnx")
    train = _upload(client, "datasets", assets["train"], "npz")
    evald = _upload(client, "datasets", assets["eval"], "npz")
    job = _submit(client, _long_training_spec(model["id"], train["id"], evald["id"], epochs=epochs))
    _wait_phase(svc, client, job["id"], "epoch")
    return job


def test_cancel_a_running_job(stack: LiveService, assets: dict[str, Path]) -> None:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        job = _training_job_in_its_first_epoch(stack, client, assets, epochs=500)
        t0 = time.monotonic()
        r = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code in (200, 202) and r.json()["status"] in ("cancelling", "cancelled")
        done = stack.wait_job(client, job["id"], timeout=60)
        assert done["status"] == "cancelled"
        assert time.monotonic() - t0 < 30


def test_worker_killed_mid_job_is_retried_and_completes_once(stack: LiveService, assets: dict[str, Path]) -> None:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        job = _training_job_in_its_first_epoch(stack, client, assets, epochs=6)
        children = stack.worker_children()
        assert children, "the worker has no pool process"
        for child in children:
            child.kill()  # SIGKILL the process running the task, as the OOM killer would
        done = stack.wait_job(client, job["id"], timeout=240)
        assert done["status"] == "succeeded", (done, stack.logs("worker.log"))
        assert done["attempt"] == 2
        names = [a["name"] for a in done["result"]["artifacts"]]
        assert names.count("model.onnx") == 1
        events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 500}).json()["data"]
        assert any("restarted (attempt 2)" in e["message"] for e in events)
        assert sum(1 for e in events if e["kind"] == "status" and e["data"].get("status") == "succeeded") == 1
