"""Submit-time checks a JobSpec cannot make on its own: ids exist for the owner, data fits the model."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from api.errors import ProblemError
from api.services.convertibility import distill_model_errors, torch_step_errors
from api.services.lookup import find_owned
from models.spec import CLASSIFICATION_TASKS, DistillStep, JobSpec, StudentModel
from models.tables import Dataset, Model

ROLES = ("train", "eval", "calibration")


def _raise(errors: list[dict[str, Any]]) -> None:
    if errors:
        first = errors[0]
        raise ProblemError(422, "validation_error", f"{first['field']}: {first['message']}", errors=errors)


def _fmt_shape(shape: list[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _class_id(label: str) -> int | None:
    """A label that is a class index (``"3"``, ``"-1"``), else None (names, ``"²"``, ``"--1"`` are not)."""
    digits = label[1:] if label.startswith("-") else label
    return int(label) if digits.isdecimal() else None


def _npz_against_inputs(field: str, ds: Dataset, model_meta: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """Errors where the npz arrays do not fit the ONNX model's inputs (names, rank, fixed dims, labels)."""
    errors: list[dict[str, Any]] = []
    meta = ds.meta or {}
    fields: dict[str, Any] = meta.get("fields") or {}
    arrays = ", ".join(sorted(fields)) or "none"
    for inp in model_meta.get("inputs") or []:
        name = inp["name"]
        if name not in fields:
            errors.append({"field": field, "message": f"dataset {ds.id} has no array {name!r} for the model "
                                                      f"input {name!r} (its arrays: {arrays})"})
            continue
        want: list[Any] = inp.get("shape") or []
        have: list[Any] = fields[name].get("shape") or []
        if not want:
            continue  # rank unknown in the graph
        mismatch = len(want) != len(have) or any(
            isinstance(w, int) and w > 0 and w != h for w, h in zip(want[1:], have[1:], strict=False)
        )
        if mismatch:
            errors.append({"field": field, "message": f"array {name!r} has shape {_fmt_shape(have)} but the model "
                                                      f"input {name!r} needs {_fmt_shape(want)}"})
    if "labels" in fields:
        n_labels = (fields["labels"].get("shape") or [0])[0]
        if n_labels != meta.get("num_samples"):
            errors.append({"field": field, "message": f"array 'labels' has {n_labels} entries but the dataset has "
                                                      f"{meta.get('num_samples')} samples"})
        outputs = model_meta.get("outputs") or []
        classes = meta.get("classes") or []
        ids = [_class_id(c) for c in classes]
        if task in CLASSIFICATION_TASKS and outputs and ids and all(i is not None for i in ids):
            shape = outputs[0].get("shape") or []
            if len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 1:
                top = max(i for i in ids if i is not None)
                if top >= shape[1]:
                    errors.append({"field": field, "message": f"array 'labels' holds class {top} but the model "
                                                              f"output {outputs[0]['name']!r} has {shape[1]} classes"})
    return errors


# Models whose position ids start after the padding index (HF's create_position_ids_from_input_ids).
_PADDED_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert", "longformer", "ibert", "mpnet"})


def _budget_and_limits(spec: JobSpec, model: Model) -> list[dict[str, Any]]:
    """Settings the worker could only fail on after running: an accuracy budget with nothing to measure
    it on, a text length past the positions the model has."""
    errors: list[dict[str, Any]] = []
    if spec.evaluate.max_accuracy_drop is not None and spec.data.eval is None:
        errors.append({"field": "evaluate.max_accuracy_drop",
                       "message": "an accuracy budget needs data.eval to measure the accuracy on"})
    config = (model.meta or {}).get("config") or {}
    positions = config.get("max_position_embeddings")
    if model.format == "hf" and spec.task != "image-classification" and isinstance(positions, int) and positions > 0:
        if str(config.get("model_type", "")).lower() in _PADDED_POSITIONS:
            positions -= 2
        if spec.text.max_length > positions:
            errors.append({"field": "text.max_length",
                           "message": f"{spec.text.max_length} is more than the {positions} positions the model "
                                      f"has (max_position_embeddings); use at most {positions}"})
    return errors


def check_references(session: Session, owner: str, spec: JobSpec) -> Model:
    """The spec's input model after checking every referenced id and the data's fit; else 422 naming fields."""
    errors: list[dict[str, Any]] = []

    def model_exists(model_id: str, field: str) -> Model | None:
        row = find_owned(session, Model, owner, model_id)
        if row is None:
            errors.append({"field": field, "message": f"unknown model {model_id!r}"})
            return None
        return row

    model = model_exists(spec.model, "model")
    datasets: dict[str, Dataset] = {}
    for role in ROLES:
        ds_id = getattr(spec.data, role)
        if ds_id is None:
            continue
        ds = find_owned(session, Dataset, owner, ds_id)
        if ds is None:
            errors.append({"field": f"data.{role}", "message": f"unknown dataset {ds_id!r}"})
        else:
            datasets[role] = ds
    for i, step in enumerate(spec.steps):
        if isinstance(step, DistillStep):
            if step.teacher not in ("input", "current"):
                model_exists(step.teacher, f"steps.{i}.teacher")
            if isinstance(step.student, StudentModel):
                model_exists(step.student.model, f"steps.{i}.student.model")
    _raise(errors)
    assert model is not None
    if model.format == "onnx":
        for role, ds in datasets.items():
            if ds.format == "npz":
                errors.extend(_npz_against_inputs(f"data.{role}", ds, model.meta or {}, spec.task))
        errors.extend(torch_step_errors(spec, model.meta or {}))
    errors.extend(_budget_and_limits(spec, model))
    errors.extend(distill_model_errors(session, owner, spec))
    _raise(errors)
    return model
