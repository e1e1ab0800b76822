"""A new user's first hour, on the real service (API + Celery worker on Redis + PostgreSQL) through the CLI:
today's ``torch.onnx.export`` output (model.onnx + model.onnx.data, opset 20) zipped and uploaded, a prune +
distill job with a name and metadata, metric values in ``jobs logs``, HEAD on the download, and a model that
names its labels."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests import factories_onnx
from tests import factories_train as f
from tests.e2e.harness import LiveService

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).with_name("modelpress")


def mp(url: str, *args: str, check: int = 0) -> str:
    """Run the ``modelpress`` command as a user would; its stdout (asserting the exit code)."""
    cmd = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "client.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    env.update({"MODELPRESS_URL": url, "COLUMNS": "200"})
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def test_todays_pytorch_export_prunes_and_comes_back_described(distributed: LiveService, tmp_path: Path) -> None:
    import torch

    torch.manual_seed(0)
    src = factories_onnx.default_export(f.residual_cnn(), tmp_path / "export", torch.zeros(2, 1, 8, 8))
    packed = factories_onnx.archive_of(src, tmp_path / "cnn.zip")
    train, evald = f.digits()
    np.savez(tmp_path / "train.npz", input=train.inputs["input"][:256], labels=train.labels[:256])
    np.savez(tmp_path / "eval.npz", input=evald.inputs["input"][:128], labels=evald.labels[:128])
    url = distributed.url

    model = json.loads(mp(url, "models", "upload", str(packed), "--json"))
    assert model["format"] == "onnx" and model["meta"]["external_data"] == ["model.onnx.data"]
    assert "deduplicated" in mp(url, "models", "upload", str(packed), "--name", "again")
    train_id = json.loads(mp(url, "datasets", "upload", str(tmp_path / "train.npz"), "--json"))["id"]
    eval_id = json.loads(mp(url, "datasets", "upload", str(tmp_path / "eval.npz"), "--json"))["id"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"model: {model['id']}\ntask: image-classification\ndata: {{train: {train_id}, eval: {eval_id}}}\n"
        "name: first-hour\nmetadata: {team: vision}\n"
        "steps:\n  - {type: prune, method: structured, ratio: 0.5}\n  - {type: distill, epochs: 2}\n"
        "evaluate:\n  latency: {runs: 5, warmup: 1, threads: 1, batch_size: 4}\n"
    )
    job_id = mp(url, "jobs", "submit", str(spec), "--meta", "run=1").strip()
    mp(url, "jobs", "wait", job_id, "--timeout", "240")
    logs = mp(url, "jobs", "logs", job_id)
    assert re.search(r"epoch 2/2  loss=\d", logs), logs
    listed = json.loads(mp(url, "jobs", "list", "--meta", "team=vision", "--meta", "run=1", "--json"))
    assert [j["id"] for j in listed] == [job_id] and listed[0]["name"] == "first-hour"

    with httpx.Client(base_url=url, timeout=30) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
        arts = {a["name"]: a for a in job["result"]["artifacts"]}
        head = client.head(arts["model.onnx"]["url"])
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(arts["model.onnx"]["size_bytes"])
    report = job["result"]["report"]
    assert report["output"]["params"] < 0.5 * report["input"]["params"]
    assert report["environment"]["cpu_model"] and report["output"]["latency_setup"]["provider"] == "CPUExecutionProvider"

    out = tmp_path / "out"
    mp(url, "download", job_id, str(out))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["modelpress.labels"]) == [str(i) for i in range(10)]
    logits = session.run(None, {"input": evald.inputs["input"][:8]})[0]
    assert logits.shape == (8, 10)
