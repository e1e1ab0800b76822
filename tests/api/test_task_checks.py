"""Submit-time checks of multi-task steps through ``POST /v1/jobs``: an unknown dataset, a label set that
disagrees, a repeated task name and arrays that do not fit the model are each a 422 naming the task and field;
a good multi-task spec is accepted with no top-level data."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api import builders
from tests.api.test_spec_checks import X_4, _accepted, _refused

LABELS = {"labels": {"dtype": "int64", "shape": [8]}}


@pytest.fixture(autouse=True)
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Accepted jobs are recorded instead of sent to the broker."""
    import worker.celery_app

    calls: list[str] = []
    monkeypatch.setattr(worker.celery_app, "enqueue_job", lambda job_id, queue: calls.append(job_id))
    return calls


def _ds(classes: list[str] | None, fields: dict[str, Any] | None = None) -> str:
    return builders.insert_dataset(meta={"num_samples": 8, "fields": fields or {**X_4, **LABELS}, "classes": classes})


def _spec(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": builders.insert_model(), "task": "image-classification",
            "steps": [{"type": "finetune", "tasks": tasks}]}


def test_a_good_multitask_spec_needs_no_top_level_data(client: TestClient, enqueued: list[str]) -> None:
    tasks: list[dict[str, Any]] = [{"name": "parity", "data": {"train": _ds(["0", "1"]), "eval": _ds(["0", "1"])}},
             {"name": "digit", "data": {"train": _ds(["0", "1", "2"])}, "weight": 2.0, "labels": ["2", "1", "0"]}]
    _accepted(client, {**_spec(tasks), "steps": [{"type": "finetune", "tasks": tasks, "sampling": "temperature",
                                                   "temperature": 3.0}]})
    assert len(enqueued) == 1


def test_an_unknown_dataset_names_the_task_and_field(client: TestClient) -> None:
    tasks = [{"name": "a", "data": {"train": _ds(["0", "1"])}}, {"name": "b", "data": {"train": "ds_nope"}}]
    assert _refused(client, _spec(tasks)) == [
        {"field": "steps.0.tasks.1.data.train", "message": "task 'b': unknown dataset 'ds_nope'"}]


def test_label_set_mismatches(client: TestClient) -> None:
    train, odd_eval = _ds(["0", "1"]), _ds(["0", "1", "7"])
    errors = _refused(client, _spec([{"name": "a", "data": {"train": train, "eval": odd_eval}}]))
    assert errors[0]["field"] == "steps.0.tasks.0.data.eval"
    assert "label set mismatch" in errors[0]["message"] and "['7']" in errors[0]["message"]
    errors = _refused(client, _spec([{"name": "a", "data": {"train": train}, "labels": ["0", "1", "2"]}]))
    assert errors == [{"field": "steps.0.tasks.0.labels",
                       "message": f"task 'a': labels ['0', '1', '2'] but dataset {train} holds ['0', '1']"}]
    unlabelled = _ds(None, X_4)
    errors = _refused(client, _spec([{"name": "a", "data": {"train": unlabelled}}]))
    assert errors[0]["field"] == "steps.0.tasks.0.data.train" and "has no labels" in errors[0]["message"]


def test_a_repeated_task_name_is_422(client: TestClient) -> None:
    ds = _ds(["0", "1"])
    errors = _refused(client, _spec([{"name": "a", "data": {"train": ds}}, {"name": "b", "data": {"train": ds}},
                                     {"name": "a", "data": {"train": ds}}]))
    assert errors == [{"field": "steps.0.tasks.2.name",
                       "message": "task 'a' is repeated (steps.0.tasks.0.name)"}]


def test_arrays_that_do_not_fit_the_model_name_the_task(client: TestClient) -> None:
    wrong = _ds(["0", "1"], {"pixels": {"dtype": "float32", "shape": [8, 4]}, **LABELS})
    errors = _refused(client, _spec([{"name": "a", "data": {"train": wrong}}]))
    assert errors[0]["field"] == "steps.0.tasks.0.data.train"
    assert errors[0]["message"].startswith("task 'a': dataset") and "no array 'x'" in errors[0]["message"]


@pytest.mark.parametrize(("step", "message"), [
    ({"tasks": [{"name": "a", "data": {"train": "ds_x"}}], "num_labels": 3}, "num_labels does not apply with tasks"),
    ({"sampling": "uniform"}, "sampling and temperature apply with tasks only"),
    ({"tasks": [{"name": "1bad", "data": {"train": "ds_x"}}]}, "String should match pattern"),
])
def test_step_parameter_errors(client: TestClient, step: dict[str, Any], message: str) -> None:
    spec = {"model": builders.insert_model(), "data": {"train": _ds(["0", "1"])},
            "steps": [{"type": "finetune", **step}]}
    errors = _refused(client, spec)
    assert message in errors[0]["message"] and errors[0]["field"].startswith("steps.0")


def _merge_spec(ds: str, **step: Any) -> dict[str, Any]:
    tasks = step.pop("tasks", [{"name": "x", "data": {"train": ds}}, {"name": "b", "data": {"train": ds}}])
    return {"model": builders.insert_model(), "task": "image-classification",
            "steps": [{"type": "finetune", "mode": "lora", "adapters": "merge", "tasks": tasks, **step}]}


def test_a_good_adapter_merge_spec_is_accepted(client: TestClient, enqueued: list[str]) -> None:
    ds = _ds(["0", "1"])
    _accepted(client, _merge_spec(ds, tasks=[{"name": "x", "data": {"train": ds}, "rank": 4},
                                             {"name": "b", "data": {"train": ds}, "weight": 0.5}],
                                  merge={"methods": ["cat", "ties_svd"], "density": 0.3, "refit_heads": False}))
    assert len(enqueued) == 1


@pytest.mark.parametrize(("step", "field", "message"), [
    ({"mode": "full"}, "steps.0.mode", "adapters 'merge' trains one LoRA adapter per task; set mode 'lora'"),
    ({"tasks": "one"}, "steps.0.tasks", "adapters 'merge' needs two tasks or more (one adapter per task), got 1"),
    ({"tasks": "ranks"}, "steps.0.merge.methods.0",
     "'linear' needs every adapter at one rank, but task 'x' has r=8 and task 'b' r=4 (use cat or an *_svd method)"),
    ({"merge": {"methods": ["cat", "ties", "cat"]}}, "steps.0.merge.methods.2", "'cat' is repeated"),
    ({"sampling": "uniform"}, "steps.0.sampling", "each adapter trains on its own task alone"),
    ({"adapters": None, "tasks": "ranks"}, "steps.0.tasks.1.rank", "task 'b': rank applies with adapters 'merge' only"),
    ({"adapters": None, "merge": {}}, "steps.0.merge", "applies with adapters 'merge' only"),
    ({"tasks": None}, "steps.0.adapters", "merging adapters takes one adapter per task, and the step names no tasks"),
    ({"merge": {"methods": ["mean"]}}, "steps.0.merge.methods.0", "Input should be 'linear'"),
    ({"adapter_task": "c"}, "steps.0.adapter_task", "'c' is not one of the step's tasks"),
    ({"adapters": None, "adapter_task": "a"}, "steps.0.adapter_task", "applies with adapters 'merge' only"),
])
def test_adapter_merge_errors_name_the_step_task_and_field(client: TestClient, step: dict[str, Any], field: str,
                                                           message: str) -> None:
    ds = _ds(["0", "1"])
    named = {"one": [{"name": "x", "data": {"train": ds}}],
             "ranks": [{"name": "x", "data": {"train": ds}}, {"name": "b", "data": {"train": ds}, "rank": 4}]}
    if isinstance(step.get("tasks"), str):
        step = {**step, "tasks": named[step["tasks"]]}
    spec = _merge_spec(ds, **step)
    if step.get("tasks", "") is None:
        spec["data"] = {"train": ds}
    errors = _refused(client, spec)
    assert errors[0]["field"].startswith(field) and message in errors[0]["message"], errors



def test_a_good_baselines_spec_is_accepted(client: TestClient, enqueued: list[str]) -> None:
    tasks = [{"name": n, "data": {"train": _ds(["0", "1"]), "eval": _ds(["0", "1"])}} for n in ("a", "b")]
    _accepted(client, {**_spec(tasks), "steps": [{"type": "finetune", "tasks": tasks, "baselines": "single_task"}]})
    assert len(enqueued) == 1  # the job alone: its worker queues the baselines


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"tasks": "one"}, "steps.0.baselines", "a single-task baseline of a step with one task is the step itself"),
    ({"tasks": "no_eval"}, "steps.0.tasks.1.data.eval",
     "task 'b': baselines 'single_task' compares each task on its own eval rows, which are not given"),
    ({"mode": "lora", "adapters": "merge"}, "steps.0.baselines", "adapters 'merge' already measures each task's"),
    ({"tasks": None}, "steps.0.baselines", "single-task baselines compare each task of a multi-task step, and the "
                                           "step names no tasks"),
    ({"baselines": "multi"}, "steps.0.baselines", "Input should be 'single_task'"),
])
def test_baselines_errors_name_the_task_and_field(client: TestClient, change: dict[str, Any], field: str,
                                                  message: str) -> None:
    ds = _ds(["0", "1"])
    a, b = {"name": "x", "data": {"train": ds, "eval": ds}}, {"name": "b", "data": {"train": ds, "eval": ds}}
    named = {"one": [a], "no_eval": [a, {"name": "b", "data": {"train": ds}}]}
    tasks = named.get(change.get("tasks", ""), [a, b])
    step = {"type": "finetune", "baselines": "single_task", **change, "tasks": tasks}
    if change.get("tasks", "") is None:
        step["tasks"] = None
    spec = {"model": builders.insert_model(), "task": "image-classification", "steps": [step],
            **({"data": {"train": ds}} if step["tasks"] is None else {})}
    errors = _refused(client, spec)
    assert errors[0]["field"].startswith(field) and message in errors[0]["message"], errors


def test_a_search_over_multi_task_trials_checks_their_tasks_too(client: TestClient, enqueued: list[str]) -> None:
    ds = _ds(["0", "1"])
    tasks = [{"name": "a", "data": {"train": ds, "eval": ds}}, {"name": "b", "data": {"train": ds, "eval": "ds_nope"}}]
    search = {"objective": "size", "constraints": {"max_accuracy_drop": 0.02}}
    spec = {"model": builders.insert_model(), "task": "image-classification",
            "search": {**search, "space": [[{"type": "finetune", "tasks": tasks}, {"type": "quantize", "mode": "fp16"}]]}}
    assert _refused(client, spec) == [
        {"field": "search.space.0.0.tasks.1.data.eval", "message": "task 'b': unknown dataset 'ds_nope'"}]
    tasks[1]["data"] = {"train": ds, "eval": ds}
    _accepted(client, {**spec, "search": {**search, "prefix": [{"type": "finetune", "tasks": tasks}], "space": "auto"}})
    assert len(enqueued) == 1


def test_an_accuracy_budget_on_a_multi_task_job_needs_every_task_s_eval_rows(client: TestClient,
                                                                             enqueued: list[str]) -> None:
    ds = _ds(["0", "1"])
    tasks = [{"name": "a", "data": {"train": ds, "eval": ds}}, {"name": "b", "data": {"train": ds}}]
    spec = {**_spec(tasks), "evaluate": {"max_accuracy_drop": 0.02}}
    assert _refused(client, spec) == [{"field": "steps.0.tasks.1.data.eval", "message": "task 'b': the accuracy "
                                       "budget holds on every task, measured on its own eval rows, which are not given"}]
    tasks[1]["data"] = {"train": ds, "eval": ds}
    _accepted(client, {**_spec(tasks), "evaluate": {"max_accuracy_drop": 0.02}})  # no data.eval needed
    assert len(enqueued) == 1
