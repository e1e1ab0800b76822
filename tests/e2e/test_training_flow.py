"""End to end over HTTP on Redis + PostgreSQL (a shared local store: the S3 stack's jobs are
tests/e2e/test_service.py's and test_s3_storage.py's): a residual CNN uploaded as ONNX goes through
prune(structured 0.5) -> distill -> quantize(static) and comes back several times smaller at nearly the same
accuracy, with the per-step measurements and the distillation curve in the report."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests import factories_train as f
from tests.e2e.harness import LiveService

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def digits_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | float]:
    """A small trained digits ResNet as ONNX, and train / eval / calibration npz files."""
    import torch

    d = tmp_path_factory.mktemp("training-assets")
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        model, acc = f.digits_resnet_onnx(d / "resnet.onnx", widths=(32, 64), epochs=10)
    finally:
        torch.set_num_threads(threads)
    train, evald = f.digits()
    x, y = train.inputs[f.INPUT], train.labels
    np.savez(d / "train.npz", input=x, labels=y)  # type: ignore[arg-type]
    np.savez(d / "eval.npz", input=evald.inputs[f.INPUT], labels=evald.labels)  # type: ignore[arg-type]
    np.savez(d / "calib.npz", input=x[:128])
    return {"model": model, "accuracy": acc, "train": d / "train.npz", "eval": d / "eval.npz",
            "calib": d / "calib.npz"}


def _upload(client: httpx.Client, kind: str, path: Path, fmt: str) -> str:
    r = client.put(f"/v1/{kind}", params={"name": path.name, "format": fmt}, content=path.read_bytes())
    assert r.status_code in (200, 201), r.text
    return str(r.json()["id"])


def test_prune_distill_static_int8_over_http(
    distributed: LiveService, digits_assets: dict[str, Path | float], tmp_path: Path
) -> None:
    a = digits_assets
    assert isinstance(a["model"], Path) and isinstance(a["accuracy"], float)
    assert a["accuracy"] >= 0.95
    with httpx.Client(base_url=distributed.url, timeout=30) as client:
        model = _upload(client, "models", a["model"], "onnx")
        data = {role: _upload(client, "datasets", a[key], "npz")  # type: ignore[arg-type]
                for role, key in (("train", "train"), ("eval", "eval"), ("calibration", "calib"))}
        spec = {
            "model": model,
            "task": "image-classification",
            "data": data,
            "steps": [
                {"type": "prune", "method": "structured", "ratio": 0.5},
                {"type": "distill", "epochs": 3, "lr": 5e-3},
                {"type": "quantize", "mode": "static", "calibration": {"samples": 128}},
            ],
            "evaluate": {"latency": {"runs": 20, "warmup": 3}},
        }
        r = client.post("/v1/jobs", json=spec)
        assert r.status_code == 202, r.text
        job = distributed.wait_job(client, r.json()["id"], timeout=120)
        assert job["status"] == "succeeded", job
        arts = {x["name"]: x for x in job["result"]["artifacts"]}
        got = client.get(f"/v1/artifacts/{arts['model.onnx']['id']}/content")
        assert got.status_code == 200
        out_path = tmp_path / "out.onnx"
        out_path.write_bytes(got.content)

    report = job["result"]["report"]
    in_acc, out_acc = report["input"]["accuracy"], report["output"]["accuracy"]
    steps = report["steps"]
    print(
        f"input {in_acc:.3f} pruned {steps[0]['eval']['accuracy']:.3f} distilled "
        f"{steps[1]['eval']['accuracy']:.3f} output {out_acc:.3f} size x{report['gains']['size_ratio']:.1f}"
    )
    assert in_acc == pytest.approx(a["accuracy"], abs=0.005)
    assert out_acc >= in_acc - 0.05
    assert report["output"]["size_bytes"] * 5 < report["input"]["size_bytes"]
    assert len(got.content) * 5 < a["model"].stat().st_size

    prune, distill, quant = report["steps"]
    assert [s["type"] for s in report["steps"]] == ["prune", "distill", "quantize"]
    assert prune["metrics"]["params_after"] < 0.35 * prune["metrics"]["params_before"]
    assert "accuracy_after_prune" in prune["metrics"] and prune["eval"]["accuracy"] is not None
    assert [c["epoch"] for c in distill["curve"]] == [1, 2, 3]
    assert all(c["loss"] > 0 and c["accuracy"] is not None for c in distill["curve"])
    assert distill["eval"]["accuracy"] > prune["eval"]["accuracy"]
    assert quant["metrics"]["quantized_ops"].get("QuantizeLinear", 0) > 0

    sess = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    _, evald = f.digits()
    logits = sess.run(None, {sess.get_inputs()[0].name: evald.inputs[f.INPUT]})[0]
    assert float((logits.argmax(1) == evald.labels).mean()) == pytest.approx(out_acc, abs=1e-6)
