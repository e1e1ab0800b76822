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


def test_single_task_baselines_run_as_child_jobs_and_are_cached(distributed: LiveService, tmp_path: Path) -> None:
    """``baselines: single_task``: one child job per task (this worker has one slot: the job runs the baselines
    nobody took itself, never waiting on itself), each task's multi-task vs single-task metric in the report, the
    report page and the CLI table; a second job that changes only the mixing takes both from the cache."""
    from rich.console import Console

    from client.render import tasks_table

    model_path, _ = f.cnn_onnx()
    train, evald = f.digits()
    xs, ys, xe, ye = train.inputs["input"][:400], train.labels, evald.inputs["input"][:200], evald.labels
    assert ys is not None and ye is not None
    ys, ye = ys[:400], ye[:200]
    with httpx.Client(base_url=distributed.url, timeout=30) as client:
        model = _upload(client, "models", model_path, "onnx")
        ids = {}
        for name, (y, yv) in {"digit": (ys, ye), "parity": (ys % 2, ye % 2)}.items():
            for role, (x, lab) in {"train": (xs, y), "eval": (xe, yv)}.items():
                np.savez(tmp_path / f"b-{name}-{role}.npz", input=x, labels=lab)
                ids[(name, role)] = _upload(client, "datasets", tmp_path / f"b-{name}-{role}.npz", "npz")

        def submit(sampling: str) -> dict:
            spec = {"model": model, "task": "image-classification", "evaluate": {"metrics": ["accuracy", "size"]},
                    "steps": [{"type": "finetune", "epochs": 1, "batch_size": 64, "lr": 3e-3, "sampling": sampling,
                               "baselines": "single_task", "tasks": [
                                   {"name": n, "data": {"train": ids[(n, "train")], "eval": ids[(n, "eval")]}}
                                   for n in ("digit", "parity")]}]}
            r = client.post("/v1/jobs", json=spec)
            assert r.status_code == 202, r.text
            return distributed.wait_job(client, r.json()["id"], timeout=180)

        job = submit("proportional")
        assert job["status"] == "succeeded", job
        children = client.get("/v1/jobs", params={"parent": job["id"]}).json()["data"]
        page = client.get(f"/v1/jobs/{job['id']}/report.html").text
        again = submit("uniform")
        assert again["status"] == "succeeded", again
        assert client.get("/v1/jobs", params={"parent": again["id"]}).json()["data"] == []

    assert sorted(c["metadata"]["baseline_of"] for c in children) == ["0:digit", "0:parity"]
    assert {c["status"] for c in children} == {"succeeded"}
    mt = job["result"]["report"]["steps"][0]["metrics"]["multitask"]
    by_child = {c["id"]: c["result"]["report"]["steps"][0]["metrics"]["multitask"]["tasks"][0] for c in children}
    for row in mt["tasks"]:
        theirs = by_child[row["single_task_job"]]
        assert theirs["task"] == row["task"] and row["single_task"] == theirs["after"]
        assert row["vs_single_task"] == pytest.approx(row["after"] - theirs["after"]) and not row["single_task_cached"]
    assert mt["baselines"]["separate_bytes"] > mt["baselines"]["shared_bytes"]  # two CNNs against one with two heads
    assert "multi-task vs single-task" in page and "single-task baselines: 2 fine-tunes" in page
    cached = {r["task"]: r for r in again["result"]["report"]["steps"][0]["metrics"]["multitask"]["tasks"]}
    for row in mt["tasks"]:
        assert cached[row["task"]]["single_task_cached"] and cached[row["task"]]["single_task"] == row["single_task"]
        assert cached[row["task"]]["single_task_job"] == row["single_task_job"]
    console = Console(width=200, record=True)
    console.print(tasks_table(again["result"]["report"]))
    assert "(cached)" in console.export_text()


def test_task_adapters_train_as_child_jobs_and_merge(distributed: LiveService, tmp_path: Path) -> None:
    """``adapters: merge`` on a real worker: one child job per task trains its LoRA adapter and keeps it as
    ``adapter.zip`` (one slot: the job runs the children nobody took itself); the job loads them and merges. A second
    job that changes only the merge methods takes both adapters from the cache."""
    import zipfile

    from tests.worker.test_adapter_jobs import _files, _spec

    model_path, files = _files(tmp_path)
    with httpx.Client(base_url=distributed.url, timeout=30) as client:
        model = _upload(client, "models", model_path, "hf")
        ids = {k: _upload(client, "datasets", p, "text") for k, p in files.items()}

        def submit(methods: list[str]) -> dict:
            spec = _spec(model, ids)
            spec["steps"][0]["merge"] = {"methods": methods}
            r = client.post("/v1/jobs", json=spec)
            assert r.status_code == 202, r.text
            return distributed.wait_job(client, r.json()["id"], timeout=240)

        job = submit(["linear", "cat"])
        assert job["status"] == "succeeded", job
        kids = {c["metadata"]["adapter_of"]: c for c in client.get("/v1/jobs", params={"parent": job["id"]}).json()["data"]}
        arts = {k: {a["name"]: a for a in client.get(f"/v1/jobs/{c['id']}").json()["result"]["artifacts"]}
                for k, c in kids.items()}
        adapter = tmp_path / "food-adapter.zip"
        adapter.write_bytes(client.get(f"/v1/artifacts/{arts['0:food']['adapter.zip']['id']}/content").content)
        again = submit(["ties"])
        assert again["status"] == "succeeded", again
        assert client.get("/v1/jobs", params={"parent": again["id"]}).json()["data"] == []

    assert sorted(kids) == ["0:food", "0:topic"] and {c["status"] for c in kids.values()} == {"succeeded"}
    names = zipfile.ZipFile(adapter).namelist()
    assert {"adapter.json", "head.safetensors", "peft/food/adapter_config.json"} <= set(names), names
    merge = job["result"]["report"]["steps"][0]["metrics"]["multitask"]["merge"]
    assert merge["trained"] == "one child job per task, loaded here" and merge["chosen"] in ("linear", "cat")
    assert {t: merge["individual"][t]["job_id"] for t in ("topic", "food")} == {
        t: kids[f"0:{t}"]["id"] for t in ("topic", "food")}
    cached = again["result"]["report"]["steps"][0]["metrics"]["multitask"]["merge"]
    assert cached["chosen"] == "ties" and cached["individual"] == merge["individual"]
