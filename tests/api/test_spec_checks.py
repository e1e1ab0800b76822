"""Submit-time spec checks: every id exists for the owner, and npz data fits the ONNX model it is used with.

Each check is driven through ``POST /v1/jobs`` and judged by its problem+json body (``code``,
``errors[].field``, ``detail``); a refused spec creates no job.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.services.spec_checks import check_references
from models.db import session_scope
from models.spec import JobSpec
from models.tables import Job, Model
from tests.api import builders

X_4 = {"x": {"dtype": "float32", "shape": [8, 4]}}
LABELS_8 = {"labels": {"dtype": "int64", "shape": [8]}}


@pytest.fixture(autouse=True)
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Accepted jobs are recorded instead of sent to the broker."""
    import worker.celery_app

    calls: list[str] = []
    monkeypatch.setattr(worker.celery_app, "enqueue_job", lambda job_id, queue: calls.append(job_id))
    return calls


def _jobs() -> int:
    with session_scope() as s:
        return int(s.scalar(select(func.count()).select_from(Job)) or 0)


def _refused(client: TestClient, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """POST the spec, assert a 422 validation problem that names its first field; its ``errors``."""
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["code"] == "validation_error" and problem["status"] == 422
    first = problem["errors"][0]
    assert problem["detail"] == f"{first['field']}: {first['message']}"
    assert _jobs() == 0
    errors: list[dict[str, Any]] = problem["errors"]
    return errors


def _accepted(client: TestClient, spec: dict[str, Any]) -> None:
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text


def _ds(fields: dict[str, Any], classes: list[str] | None = None, owner: str = "local", fmt: str = "npz") -> str:
    return builders.insert_dataset(owner=owner, format=fmt,
                                   meta={"num_samples": 8, "fields": fields, "classes": classes})


def _distill(**step: Any) -> list[dict[str, Any]]:
    return [{"type": "distill", **step}]


# --- ids ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"model": "mdl_missing"}, "model", "unknown model 'mdl_missing'"),
        ({"data": {"eval": "ds_missing"}}, "data.eval", "unknown dataset 'ds_missing'"),
        ({"data": {"calibration": "ds_missing"}}, "data.calibration", "unknown dataset 'ds_missing'"),
        ({"data": {"train": "ds_missing"}, "steps": _distill()}, "data.train", "unknown dataset 'ds_missing'"),
        ({"steps": _distill(teacher="mdl_t")}, "steps.0.teacher", "unknown model 'mdl_t'"),
        ({"steps": _distill(student={"model": "mdl_s"})}, "steps.0.student.model", "unknown model 'mdl_s'"),
    ],
)
def test_an_unknown_id_is_422_naming_its_field(
    client: TestClient, spec: dict[str, Any], field: str, message: str
) -> None:
    body = {"model": builders.insert_model(), "data": {"train": _ds(X_4)}, **spec}
    assert _refused(client, body) == [{"field": field, "message": message}]


def test_another_owners_ids_read_exactly_like_unknown_ones(client: TestClient) -> None:
    theirs_model = builders.insert_model(owner="someone-else")
    theirs_ds = _ds(X_4, owner="someone-else")
    mine = builders.insert_model()
    errors = _refused(client, {"model": theirs_model, "data": {"train": theirs_ds, "eval": theirs_ds},
                               "steps": _distill(teacher=theirs_model, student={"model": theirs_model})})
    assert errors == [
        {"field": "model", "message": f"unknown model {theirs_model!r}"},
        {"field": "data.train", "message": f"unknown dataset {theirs_ds!r}"},
        {"field": "data.eval", "message": f"unknown dataset {theirs_ds!r}"},
        {"field": "steps.0.teacher", "message": f"unknown model {theirs_model!r}"},
        {"field": "steps.0.student.model", "message": f"unknown model {theirs_model!r}"},
    ]
    # Their teacher is refused even when the job's own model is mine.
    errors = _refused(client, {"model": mine, "data": {"train": _ds(X_4)}, "steps": _distill(teacher=theirs_model)})
    assert errors == [{"field": "steps.0.teacher", "message": f"unknown model {theirs_model!r}"}]


def test_teacher_input_and_current_and_layer_students_need_no_ids(client: TestClient) -> None:
    model, train = builders.insert_model(), _ds(X_4)
    for teacher in ("input", "current"):
        _accepted(client, {"model": model, "data": {"train": train},
                           "steps": _distill(teacher=teacher, student={"layers": 2})})
    teacher = builders.insert_model()
    _accepted(client, {"model": model, "data": {"train": train},
                       "steps": _distill(teacher=teacher, student={"model": teacher})})


def test_id_errors_are_reported_before_the_data_is_checked_against_the_model(client: TestClient) -> None:
    wrong_arrays = _ds({"pixels": {"dtype": "float32", "shape": [8, 4]}})
    errors = _refused(client, {"model": builders.insert_model(),
                               "data": {"train": wrong_arrays, "eval": "ds_missing"}, "steps": _distill()})
    assert errors == [{"field": "data.eval", "message": "unknown dataset 'ds_missing'"}]


def test_check_references_returns_the_input_model(pg_env: str) -> None:
    model_id = builders.insert_model()
    with session_scope() as s:
        spec = JobSpec.model_validate({"model": model_id, "data": {"eval": _ds(X_4)}})
        assert check_references(s, "local", spec).id == model_id


# --- steps that need training data (JobSpec's own checks, answered the same way) ----------------------


@pytest.mark.parametrize("step", ["finetune", "distill"])
def test_a_training_step_without_train_data_is_422(client: TestClient, step: str) -> None:
    spec = {"model": builders.insert_model(), "data": {"eval": _ds(X_4)},
            "steps": [{"type": step}]}
    errors = _refused(client, spec)
    assert errors == [{"field": "steps.0", "message": f"a '{step}' step needs data.train"}]


def test_a_training_step_after_quantize_is_422(client: TestClient) -> None:
    spec = {"model": builders.insert_model(), "data": {"train": _ds(X_4)},
            "steps": [{"type": "quantize"}, {"type": "finetune"}]}
    errors = _refused(client, spec)
    assert errors[0]["field"] == "steps.1" and "cannot follow 'quantize'" in errors[0]["message"]


# --- npz arrays against the ONNX model's inputs --------------------------------------------------------


def test_a_missing_input_array_names_the_role_and_the_arrays_it_has(client: TestClient) -> None:
    ds = _ds({"pixels": {"dtype": "float32", "shape": [8, 4]}, "extra": {"dtype": "int64", "shape": [8]}})
    errors = _refused(client, {"model": builders.insert_model(), "data": {"calibration": ds}})
    assert errors == [{"field": "data.calibration", "message": f"dataset {ds} has no array 'x' for the model input "
                                                               "'x' (its arrays: extra, pixels)"}]


@pytest.mark.parametrize(
    ("have", "want"),
    [([8, 5], "[batch, 4]"), ([8, 4, 1], "[batch, 4]"), ([8], "[batch, 4]")],
)
def test_an_array_of_the_wrong_shape_is_422(client: TestClient, have: list[int], want: str) -> None:
    ds = _ds({"x": {"dtype": "float32", "shape": have}})
    errors = _refused(client, {"model": builders.insert_model(), "data": {"eval": ds}})
    shown = "[" + ", ".join(map(str, have)) + "]"
    assert errors == [{"field": "data.eval", "message": f"array 'x' has shape {shown} but the model input 'x' "
                                                        f"needs {want}"}]


def test_dynamic_dims_the_batch_axis_and_an_unknown_rank_fit_anything(client: TestClient) -> None:
    dynamic = builders.insert_model(inputs=[{"name": "x", "dtype": "float32", "shape": ["batch", "seq", 4]}])
    _accepted(client, {"model": dynamic, "data": {"eval": _ds({"x": {"dtype": "float32", "shape": [2, 77, 4]}})}})
    unknown_rank = builders.insert_model(inputs=[{"name": "x", "dtype": "float32", "shape": []}])
    _accepted(client, {"model": unknown_rank, "data": {"eval": _ds({"x": {"dtype": "float32", "shape": [8, 9]}})}})
    fixed_batch = builders.insert_model(inputs=[{"name": "x", "dtype": "float32", "shape": [1, 4]}])
    _accepted(client, {"model": fixed_batch, "data": {"eval": _ds(X_4)}})


def test_every_role_and_every_input_is_checked(client: TestClient) -> None:
    model = builders.insert_model(inputs=[{"name": "a", "dtype": "float32", "shape": ["batch", 2]},
                                          {"name": "b", "dtype": "float32", "shape": ["batch", 3]}])
    fits = _ds({"a": {"dtype": "float32", "shape": [8, 2]}, "b": {"dtype": "float32", "shape": [8, 3]}})
    no_b = _ds({"a": {"dtype": "float32", "shape": [8, 2]}})
    bad_a = _ds({"a": {"dtype": "float32", "shape": [8, 7]}, "b": {"dtype": "float32", "shape": [8, 3]}})
    errors = _refused(client, {"model": model, "data": {"train": no_b, "eval": fits, "calibration": bad_a},
                               "steps": _distill()})
    assert [e["field"] for e in errors] == ["data.train", "data.calibration"]
    assert "no array 'b'" in errors[0]["message"] and "array 'a' has shape [8, 7]" in errors[1]["message"]


def test_only_npz_data_for_an_onnx_model_is_checked(client: TestClient) -> None:
    wrong_arrays = {"pixels": {"dtype": "float32", "shape": [8, 4]}}
    hf_model = builders.insert_model(format="hf")
    _accepted(client, {"model": hf_model, "data": {"eval": _ds(wrong_arrays)}})
    text = _ds({"text": {"dtype": "str"}, "label": {"dtype": "str"}}, fmt="text")
    _accepted(client, {"model": builders.insert_model(), "data": {"eval": text}})


# --- labels --------------------------------------------------------------------------------------------


def test_a_label_count_that_differs_from_the_samples_is_422(client: TestClient) -> None:
    ds = _ds({**X_4, "labels": {"dtype": "int64", "shape": [6]}}, classes=["0", "1"])
    errors = _refused(client, {"model": builders.insert_model(), "data": {"eval": ds}})
    assert errors == [{"field": "data.eval", "message": "array 'labels' has 6 entries but the dataset has 8 samples"}]


@pytest.mark.parametrize("task", ["image-classification", "text-classification"])
def test_a_class_id_beyond_the_models_outputs_is_422_for_classification(client: TestClient, task: str) -> None:
    ds = _ds({**X_4, **LABELS_8}, classes=["0", "1", "3"])
    errors = _refused(client, {"model": builders.insert_model(), "task": task, "data": {"eval": ds}})
    assert errors == [{"field": "data.eval", "message": "array 'labels' holds class 3 but the model output 'y' "
                                                        "has 3 classes"}]


@pytest.mark.parametrize(
    ("task", "classes", "outputs"),
    [
        ("generic", ["0", "7"], None),  # not a classification task
        ("feature-extraction", ["0", "7"], None),
        ("image-classification", ["0", "1", "2"], None),  # every id within the 3 outputs
        ("image-classification", ["cat", "dog", "emu", "owl"], None),  # names, not ids
        ("image-classification", ["0", "7"], [{"name": "y", "dtype": "float32", "shape": ["batch", "n"]}]),
        ("image-classification", ["0", "7"], [{"name": "y", "dtype": "float32", "shape": ["batch", 1]}]),
        ("image-classification", ["0", "7"], [{"name": "y", "dtype": "float32", "shape": ["batch", 3, 3]}]),
    ],
)
def test_labels_the_class_check_cannot_judge_are_accepted(
    client: TestClient, task: str, classes: list[str], outputs: list[dict[str, Any]] | None
) -> None:
    ds = _ds({**X_4, **LABELS_8}, classes=classes)
    _accepted(client, {"model": builders.insert_model(outputs=outputs), "task": task, "data": {"eval": ds}})


@pytest.mark.parametrize("odd", ["²", "--1"])
def test_labels_that_only_look_numeric_are_names_not_a_500(client: TestClient, odd: str) -> None:
    # "²".isdigit() is true and "--1".lstrip("-") is "1", but int() refuses both: this used to answer 500.
    model = client.put("/v1/models", params={"format": "onnx"}, content=builders.onnx_bytes()).json()
    data = builders.npz_bytes({"x": np.ones((8, 4), np.float32), "labels": np.array([odd, "0"] * 4)})
    ds = client.put("/v1/datasets", params={"format": "npz"}, content=data).json()
    assert odd in ds["classes"]
    _accepted(client, {"model": model["id"], "task": "image-classification", "data": {"eval": ds["id"]}})


# --- budgets and limits the worker could only fail on --------------------------------------------------


def test_an_accuracy_budget_without_eval_data_is_422(client: TestClient) -> None:
    spec = {"model": builders.insert_model(), "evaluate": {"max_accuracy_drop": 0.01}}
    errors = _refused(client, spec)
    assert errors[0]["field"] == "evaluate.max_accuracy_drop" and "data.eval" in errors[0]["message"]
    _accepted(client, {**spec, "data": {"eval": _ds(X_4)}})


def _hf_model(config: dict[str, Any]) -> str:
    model_id = builders.insert_model(format="hf")
    with session_scope() as s:
        row = s.get(Model, model_id)
        assert row is not None
        row.meta = {**row.meta, "config": config, "task": "text"}
    return model_id


@pytest.mark.parametrize(("config", "limit"), [({"model_type": "bert", "max_position_embeddings": 64}, 64),
                                               ({"model_type": "roberta", "max_position_embeddings": 514}, 512)])
def test_text_max_length_over_the_models_positions_is_422(
    client: TestClient, config: dict[str, Any], limit: int
) -> None:
    model = _hf_model(config)
    errors = _refused(client, {"model": model, "task": "text-classification", "text": {"max_length": limit + 1}})
    assert errors[0]["field"] == "text.max_length" and str(limit) in errors[0]["message"]
    _accepted(client, {"model": model, "task": "text-classification", "text": {"max_length": limit}})
