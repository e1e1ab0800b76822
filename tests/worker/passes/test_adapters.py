"""Multi-task transfer by adapters: the merge is picked by measurement (the argmax of the measured means, a failed
method never wins), and a two-task job through the API (upload, submit, the worker's execute, download) trains a
LoRA adapter per task on a tiny random-init BERT, merges them by every method asked for (the heads refit on the
merged features), and comes back as one ONNX file with an output per task and a report (JSON, HTML page) holding
the merge table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from models.spec import JobSpec
from tests import factories_train as f
from tests.factories_lm import licence_paragraphs, tiny_lm_archive
from worker.context import LocalContext
from worker.core import StepFailed
from worker.passes.adapters import pick, why
from worker.passes.finetune import FinetunePass

METHODS = ["linear", "ties", "dare_ties", "dare_linear", "cat"]


def test_the_merge_with_the_best_mean_wins_and_a_failed_method_never_does() -> None:
    table: list[dict[str, Any]] = [
        {"method": "linear", "error": "All adapters must have the same r value"},
        {"method": "ties", "per_task": {"a": 0.9, "b": 0.5}, "mean": 0.7},
        {"method": "cat", "per_task": {"a": 0.8, "b": 0.8}, "mean": 0.8},
        {"method": "svd", "per_task": {"a": 0.8, "b": 0.8}, "mean": 0.8},
    ]
    chosen = pick(table)
    assert chosen["method"] == "cat"  # the first of equals
    text = why(table, chosen, {"a": {"validation": 0.95}, "b": {"validation": 0.85}})
    assert text == ("cat: highest mean validation accuracy over the tasks (80.0%); next svd (80.0%); furthest from "
                    "its own adapter: a (-15.0 points); not possible here: linear")
    with pytest.raises(StepFailed, match="no merge method worked: linear: All adapters"):
        pick(table[:1])
    # a causal LM's merge is chosen by the lowest mean eval loss
    losses = [{"method": "cat", "per_task": {"a": 2.0}, "mean": 2.0}, {"method": "ties", "per_task": {"a": 1.5}, "mean": 1.5}]
    assert pick(losses, higher_is_better=False)["method"] == "ties"
    assert why(losses, losses[1], {"a": {"validation": 1.25}}, "eval_loss", False) == (
        "ties: lowest mean validation eval loss over the tasks (1.5); next cat (2); furthest from its own adapter: "
        "a (+0.25)")


def test_a_causal_lm_merges_its_task_adapters_into_one_plain_model(tmp_path: Path) -> None:
    gpl, apache = licence_paragraphs(("GPL-3",)), licence_paragraphs(("Apache-2.0",))

    def choice(rows: list[str], label: str) -> list[dict[str, str]]:
        return [{"text": p[:60], "label": label} for p in rows]

    files: dict[str, tuple[Path, str, dict[str, Any]]] = {
        "lm-tr": (f.write_jsonl(tmp_path / "lm.jsonl", [{"text": p} for p in (gpl + apache)[:16]]), "text", {}),
        "which-tr": (f.write_jsonl(tmp_path / "w.jsonl", choice(gpl[:8], "gpl") + choice(apache[:8], "apache")),
                     "text", {}),
        "which-ev": (f.write_jsonl(tmp_path / "we.jsonl", choice(gpl[10:16], "gpl") + choice(apache[10:16], "apache")),
                     "text", {}),
    }
    spec = JobSpec.model_validate({
        "model": "lm", "task": "text-generation", "text": {"max_length": 32},
        "steps": [{"type": "finetune", "mode": "lora", "epochs": 2, "batch_size": 8, "lr": 1e-2,
                   "tasks": [{"name": "lm", "data": {"train": "lm-tr"}},
                             {"name": "which", "data": {"train": "which-tr", "eval": "which-ev"}}],
                   "adapters": "merge", "merge": {"methods": ["linear", "cat"]}}],
    })
    ctx = LocalContext(tmp_path / "work", spec, models={"lm": (tiny_lm_archive(tmp_path), "hf", {})}, datasets=files,
                       device="cpu")
    result = FinetunePass().run(ctx.load_model("input"), spec.steps[0], ctx)  # type: ignore[arg-type]
    merge = result.metrics["multitask"]["merge"]
    print(merge["why"])
    assert merge["metric"] == "eval_loss" and [m["method"] for m in merge["methods"]] == ["linear", "cat"]
    chosen = min(merge["methods"], key=lambda m: m["mean"])
    assert merge["chosen"] == chosen["method"] and set(chosen["per_task"]) == {"lm", "which"}
    # each adapter lowered its own task's validation loss below the input model's
    for task in ("lm", "which"):
        own = merge["individual"][task]
        assert own["validation"] < own["validation_before"] - 0.02, (task, own)
    which = {r["task"]: r for r in result.metrics["multitask"]["tasks"]}["which"]
    assert which["metric"] == "accuracy" and which["eval_loss_after"] < which["eval_loss_before"]
    assert not any("lora" in k for k in result.model.module.state_dict())  # merged: a plain model to export


def _put(client: TestClient, kind: str, path: Path, fmt: str) -> str:
    r = client.put(f"/v1/{kind}", params={"name": path.name, "format": fmt}, content=path.read_bytes())
    assert r.status_code in (200, 201), r.text
    return str(r.json()["id"])


def _yes_no(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"text": r["text"], "label": "yes" if r["label"] == "food" else "no"} for r in rows]


def test_two_task_adapter_merge_job_through_the_api(unqueued_api: TestClient, tmp_path: Path) -> None:
    client = unqueued_api
    from worker import jobs

    # embeddings and the pooler adapted too: LoRA on query/value alone barely moves a random-init backbone
    model = _put(client, "models", f.tiny_bert_archive(tmp_path, layers=2, init=0.2), "hf")
    rows = {"topic": (f.sentences(200, seed=1), f.sentences(60, seed=2)),
            "food": (_yes_no(f.sentences(200, seed=3)), _yes_no(f.sentences(60, seed=4)))}
    evals: dict[str, list[dict[str, Any]]] = {}
    tasks = []
    for name, (train, held) in rows.items():
        ids = [_put(client, "datasets", f.write_jsonl(tmp_path / f"{name}-{role}.jsonl", data), "text")
               for role, data in (("train", train), ("eval", held))]
        tasks.append({"name": name, "data": {"train": ids[0], "eval": ids[1]}})
        evals[name] = held
    spec = {"model": model, "task": "text-classification", "text": {"max_length": 16},
            "steps": [{"type": "finetune", "mode": "lora", "epochs": 5, "batch_size": 16, "lr": 2e-2,
                       "lora": {"target_modules": ["word_embeddings", "query", "value", "dense"]},
                       "tasks": tasks, "adapters": "merge", "merge": {"methods": METHODS, "density": 0.5}}],
            "evaluate": {"latency": {"runs": 3, "warmup": 1}}}
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert jobs.execute(job_id) == "succeeded"
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job.get("error")

    metrics = job["result"]["report"]["steps"][0]["metrics"]
    merge = metrics["multitask"]["merge"]
    print(json.dumps({m["method"]: m.get("per_task") for m in merge["methods"]}), merge["why"])
    # each adapter learns its own task on its own (1/3 and 2/3 are chance and majority)
    assert all(merge["individual"][t]["validation"] >= 0.8 > merge["individual"][t]["validation_before"] + 0.2
               for t in rows), merge["individual"]
    # every method measured on every task's validation split; the chosen one is the best mean
    assert [m["method"] for m in merge["methods"]] == METHODS
    assert all(set(m["per_task"]) == set(rows) and m["mean"] == pytest.approx(np.mean(list(m["per_task"].values())))
               for m in merge["methods"])
    best = max(m["mean"] for m in merge["methods"])
    chosen = next(m for m in merge["methods"] if m["method"] == merge["chosen"])
    assert chosen["mean"] == best and merge["why"].startswith(f"{merge['chosen']}: highest mean")
    assert {m["density"] for m in merge["methods"] if m["method"] in ("ties", "dare_ties", "dare_linear")} == {0.5}
    # the heads, trained against their own adapter's features, refit on the merged ones lift the merge (+6 points
    # from the seeded init of heads and adapters, 0.89 -> 0.95)
    assert chosen["mean"] > np.mean(list(chosen["per_task_heads_as_trained"].values())) + 0.04

    # one ONNX file, one output per task; its accuracy is the report's
    arts = {a["name"]: a for a in job["result"]["artifacts"]}
    out = tmp_path / "merged.onnx"
    out.write_bytes(client.get(f"/v1/artifacts/{arts['model.onnx']['id']}/content").content)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits_topic", "logits_food"]
    described = json.loads(sess.get_modelmeta().custom_metadata_map["modelpress.tasks"])
    assert [t["labels"] for t in described] == [sorted(f.TEXT_CLASSES), ["no", "yes"]]
    task_rows = {t["task"]: t for t in metrics["multitask"]["tasks"]}
    assert task_rows["food"]["after"] == pytest.approx(task_rows["food"]["after_torch"], abs=0.02)
    assert all(r["after"] >= r["before"] + 0.2 and r["adapter_alone"] >= 0.8 for r in task_rows.values()), task_rows
    assert metrics["multitask"]["size"]["adapter_params"]["topic"] > 0
    assert 0.45 < metrics["multitask"]["size"]["ratio"] < 0.55  # one backbone for two tasks

    page = client.get(f"/v1/jobs/{job_id}/report.html")
    assert page.status_code == 200
    assert "Adapter merge" in page.text and f"{merge['chosen']} ★" in page.text and "adapter alone" in page.text
