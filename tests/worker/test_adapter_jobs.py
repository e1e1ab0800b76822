"""``adapters: merge`` with its task adapters trained by child jobs (``worker/adapter_jobs.py``): the job runs in
this process through ``jobs.execute``, nothing is sent to a broker, so the job runs its still-queued children
itself (as a one-slot worker does). The merged model equals the one the in-sequence path (``LocalContext``, no
children) makes from the same seed; a failed child fails the job naming its task; the job's cancel ends its
children. (With a real Celery worker: tests/e2e/test_multitask_flow.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from models.spec import JobSpec
from tests import factories_train as f
from tests.worker.passes.test_adapters import _put, _yes_no
from worker.adapter_jobs import adapter_spec


def _files(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    model = f.tiny_bert_archive(tmp_path, layers=1, init=0.2)
    rows = {"topic": (f.sentences(60, seed=1), f.sentences(24, seed=2)),
            "food": (_yes_no(f.sentences(60, seed=3)), _yes_no(f.sentences(24, seed=4)))}
    return model, {f"{name}-{role}": f.write_jsonl(tmp_path / f"{name}-{role}.jsonl", data)
                   for name, (train, held) in rows.items() for role, data in (("train", train), ("eval", held))}


def _spec(model: str, ids: dict[str, str]) -> dict[str, Any]:
    tasks = [{"name": n, "data": {"train": ids[f"{n}-train"], "eval": ids[f"{n}-eval"]}} for n in ("topic", "food")]
    return {"model": model, "task": "text-classification", "text": {"max_length": 16}, "seed": 5,
            "steps": [{"type": "finetune", "mode": "lora", "epochs": 2, "batch_size": 16, "lr": 2e-2,
                       "lora": {"target_modules": ["word_embeddings", "query", "value", "dense"]},
                       "tasks": tasks, "adapters": "merge", "merge": {"methods": ["linear", "cat"]}}],
            "evaluate": {"metrics": ["accuracy", "size"]}}


def _submit(client: TestClient, tmp_path: Path) -> tuple[str, dict[str, Any], Path, dict[str, Path]]:
    """The job's id and spec, and the files it was given."""
    model_path, files = _files(tmp_path)
    model = _put(client, "models", model_path, "hf")
    ids = {k: _put(client, "datasets", p, "text") for k, p in files.items()}
    spec = _spec(model, ids)
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    return str(r.json()["id"]), spec, model_path, files


def _children(client: TestClient, job_id: str) -> dict[str, dict[str, Any]]:
    kids = client.get("/v1/jobs", params={"parent": job_id}).json()["data"]
    return {k["metadata"]["adapter_of"]: client.get(f"/v1/jobs/{k['id']}").json() for k in kids}


def test_an_adapter_job_is_the_step_training_one_task_with_the_merge_at_its_defaults() -> None:
    spec = JobSpec.model_validate({**_spec("mdl_x", {f"{n}-{r}": f"ds_{n}{r}" for n in ("topic", "food")
                                                    for r in ("train", "eval")}),
                                   "evaluate": {"max_accuracy_drop": 0.01},
                                   "steps": [{"type": "prune", "method": "structured", "ratio": 0.25},
                                             {**_spec("m", {k: k for k in ("topic-train", "topic-eval", "food-train",
                                                                           "food-eval")})["steps"][0],
                                              "merge": {"methods": ["ties"], "validation": 0.3, "density": 0.7}},
                                             {"type": "quantize", "mode": "dynamic"}]})
    one = adapter_spec(spec, 1, "food")
    step = one.steps[1]
    assert [s.type for s in one.steps] == ["prune", "finetune"] and one.seed == 5
    assert one.evaluate.max_accuracy_drop is None  # its output is a by-product: the job holds the budget
    assert step.adapter_task == "food" and [t.name for t in step.tasks or []] == ["topic", "food"]  # type: ignore[union-attr]
    assert step.merge is not None and (step.merge.validation, step.merge.methods) == (0.3, ["linear", "ties",  # type: ignore[union-attr]
                                                                                            "dare_ties", "dare_linear", "cat"])
    with pytest.raises(ValueError, match="adapter_task: 'nope' is not one of the step's tasks"):
        adapter_spec(spec, 1, "nope")


def test_adapters_trained_by_child_jobs_merge_as_the_in_sequence_path_does(unqueued_api: TestClient, tmp_path: Path) -> None:
    from worker import jobs
    from worker.context import LocalContext
    from worker.pipeline import run

    client = unqueued_api
    job_id, spec, model_path, files = _submit(client, tmp_path)
    assert jobs.execute(job_id) == "succeeded", client.get(f"/v1/jobs/{job_id}").json().get("error")
    job = client.get(f"/v1/jobs/{job_id}").json()
    kids = _children(client, job_id)
    assert sorted(kids) == ["0:food", "0:topic"] and {k["status"] for k in kids.values()} == {"succeeded"}
    for label, kid in kids.items():
        assert "adapter.zip" in {a["name"] for a in kid["result"]["artifacts"]}, label
        assert kid["spec"]["steps"][0]["adapter_task"] == label[2:]
    merge = job["result"]["report"]["steps"][0]["metrics"]["multitask"]["merge"]
    assert merge["trained"] == "one child job per task, loaded here"
    assert {t: merge["individual"][t]["job_id"] for t in ("topic", "food")} == {
        t: kids[f"0:{t}"]["id"] for t in ("topic", "food")}
    page = client.get(f"/v1/jobs/{kids['0:food']['id']}/report.html")  # a child's report: its adapter alone
    assert page.status_code == 200 and '<section id="tasks">' in page.text
    events = [e["message"] for e in client.get(f"/v1/jobs/{job_id}/events").json()["data"]]
    assert any("task adapters: 2 jobs queued" in m for m in events), events

    # the same spec in one process, adapters one after another: the same adapters, the same merge
    local = JobSpec.model_validate({**spec, "model": "m",
                                    "steps": [{**spec["steps"][0], "tasks": [
                                        {"name": n, "data": {"train": f"{n}-train", "eval": f"{n}-eval"}}
                                        for n in ("topic", "food")]}]})
    ctx = LocalContext(tmp_path / "work", local, models={"m": (model_path, "hf", {})},
                       datasets={k: (p, "text", {}) for k, p in files.items()}, device="cpu")
    seq = run(local, ctx).report["steps"][0]["metrics"]["multitask"]["merge"]
    assert seq["trained"] == "one adapter after another in this job"
    for t in ("topic", "food"):
        assert merge["individual"][t]["validation"] == pytest.approx(seq["individual"][t]["validation"], abs=1e-6)
        assert merge["individual"][t]["best_epoch"] == seq["individual"][t]["best_epoch"]
    assert merge["chosen"] == seq["chosen"]
    for mine, theirs in zip(merge["methods"], seq["methods"], strict=True):
        assert mine["per_task"] == pytest.approx(theirs["per_task"], abs=1e-6), (mine, theirs)


def test_a_failed_adapter_job_fails_the_job_naming_its_task(unqueued_api: TestClient, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import jobs
    from worker.core import StepFailed
    from worker.passes import adapters

    def broken(family: Any, peft_model: Any, params: Any, ctx: Any, tasks: Any) -> Any:
        raise StepFailed("injected", f"no adapter for {[t.name for t in tasks]}")  # only a child trains here

    monkeypatch.setattr(adapters, "train_adapters", broken)
    client = unqueued_api
    job_id, *_ = _submit(client, tmp_path)
    assert jobs.execute(job_id) == "failed"
    job = client.get(f"/v1/jobs/{job_id}").json()
    kids = _children(client, job_id)
    assert job["error"]["code"] == "adapter_failed" and job["error"]["step"] == "steps[0] finetune"
    assert job["error"]["message"] == (f"task 'topic': its adapter job {kids['0:topic']['id']} failed: "
                                       "no adapter for ['topic']")
    # the first child's failure ends the job at once: the other, still queued, is cancelled
    assert (kids["0:topic"]["status"], kids["0:food"]["status"]) == ("failed", "cancelled")


def test_cancelling_the_job_cancels_its_adapter_jobs(unqueued_api: TestClient, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import context, jobs
    from worker.passes import adapters

    # every cancel check reads the flag: a child that trains in under CANCEL_POLL_INTERVAL_S after its last read
    # would otherwise finish before it looks again (CI saw it succeed)
    monkeypatch.setattr(context, "CANCEL_POLL_INTERVAL_S", 0.0)
    client = unqueued_api
    job_id, *_ = _submit(client, tmp_path)
    train = adapters.train_adapters

    def cancelled_meanwhile(*args: Any) -> Any:  # the user cancels the job while its first child trains
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        return train(*args)

    monkeypatch.setattr(adapters, "train_adapters", cancelled_meanwhile)
    assert jobs.execute(job_id) == "cancelled"
    kids = _children(client, job_id)
    # the running child stops at its next cancel check (its parent's flag, not its own) instead of succeeding;
    # the queued one is cancelled with the job
    assert (kids["0:topic"]["status"], kids["0:food"]["status"]) == ("cancelled", "cancelled")


def test_a_causal_lms_adapters_come_from_child_jobs_too(unqueued_api: TestClient, tmp_path: Path) -> None:
    from tests.factories_lm import licence_paragraphs, tiny_lm_archive
    from worker import jobs

    client = unqueued_api
    gpl, apache = licence_paragraphs(("GPL-3",)), licence_paragraphs(("Apache-2.0",))
    choice = [{"text": p[:60], "label": "gpl"} for p in gpl[:8]] + [{"text": p[:60], "label": "apache"}
                                                                      for p in apache[:8]]
    held = [{"text": p[:60], "label": "gpl"} for p in gpl[10:14]] + [{"text": p[:60], "label": "apache"}
                                                                      for p in apache[10:14]]
    model = _put(client, "models", tiny_lm_archive(tmp_path), "hf")
    ids = {k: _put(client, "datasets", f.write_jsonl(tmp_path / f"{k}.jsonl", rows), "text")
           for k, rows in {"lm": [{"text": p} for p in (gpl + apache)[:16]], "w": choice, "we": held}.items()}
    r = client.post("/v1/jobs", json={
        "model": model, "task": "text-generation", "text": {"max_length": 32},
        "evaluate": {"metrics": ["accuracy"], "generation": {"samples": 0}, "latency": {"runs": 1, "warmup": 0}},
        "steps": [{"type": "finetune", "mode": "lora", "epochs": 1, "batch_size": 8, "lr": 1e-2,
                   "tasks": [{"name": "lm", "data": {"train": ids["lm"]}},
                             {"name": "which", "data": {"train": ids["w"], "eval": ids["we"]}}],
                   "adapters": "merge", "merge": {"methods": ["linear"]}, "adapter_files": True}]})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert jobs.execute(job_id) == "succeeded", client.get(f"/v1/jobs/{job_id}").json().get("error")
    merge = client.get(f"/v1/jobs/{job_id}").json()["result"]["report"]["steps"][0]["metrics"]["multitask"]["merge"]
    kids = _children(client, job_id)
    assert merge["metric"] == "eval_loss" and merge["trained"] == "one child job per task, loaded here"
    for task in ("lm", "which"):  # each adapter, trained by its child, lowered its own validation loss
        own = merge["individual"][task]
        assert own["job_id"] == kids[f"0:{task}"]["id"] and own["validation"] < own["validation_before"], own
    # the adapters the children trained also leave as genai adapter files beside the merged model
    files = merge["adapter_files"]
    assert set(files["adapter_bytes"]) == {"lm", "which"} and all(r["matches_torch"] for r in files["runs"])
    names = {a["name"] for a in client.get(f"/v1/jobs/{job_id}").json()["result"]["artifacts"]}
    assert {"model.onnx", "adapters.zip"} <= names
