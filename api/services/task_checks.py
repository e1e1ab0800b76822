"""Submit-time checks of multi-task steps: every task's datasets exist for the owner, hold labelled rows whose
label sets agree (train and eval, and the task's declared ``labels``), and fit the model's inputs; each error
names the task and the field (``steps.0.tasks.1.data.eval``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from api.services.lookup import find_owned
from models.spec import LM_TASKS, JobSpec
from models.tables import Dataset, Model


def _classes(ds: Dataset) -> list[str] | None:
    found = (ds.meta or {}).get("classes")
    return [str(c) for c in found] if isinstance(found, list) else None


def task_errors(session: Session, owner: str, spec: JobSpec, model: Model | None, task: str) -> list[dict[str, Any]]:
    """Errors of the spec's ``tasks`` (``task``: the job's effective task); empty when it has none."""
    from api.services.spec_checks import _npz_against_inputs

    errors: list[dict[str, Any]] = []
    lm = task in LM_TASKS
    for at, step in spec.step_paths():  # a search's prefix and space too (``search.space.1.0.tasks.0``)
        for j, t in enumerate(getattr(step, "tasks", None) or []):
            where = f"{at}.tasks.{j}"
            found: dict[str, Dataset] = {}
            for role in ("train", "eval"):
                ref = getattr(t.data, role)
                if ref is None:
                    continue
                ds = find_owned(session, Dataset, owner, ref)
                if ds is None:
                    errors.append({"field": f"{where}.data.{role}",
                                   "message": f"task {t.name!r}: unknown dataset {ref!r}"})
                    continue
                found[role] = ds
                if model is not None and model.format == "onnx" and ds.format == "npz":
                    for e in _npz_against_inputs(f"{where}.data.{role}", ds, model.meta or {}, "generic"):
                        errors.append({**e, "message": f"task {t.name!r}: {e['message']}"})
            train = found.get("train")
            if train is None or (lm and (train.meta or {}).get("row_shape") != "choice"):
                continue
            have = _classes(train)
            if not have:
                errors.append({"field": f"{where}.data.train", "message": f"task {t.name!r}: dataset {train.id} "
                                                                          "has no labels; a task trains a head "
                                                                          "on labelled rows"})
                continue
            if t.labels is not None and sorted(t.labels) != sorted(have):
                errors.append({"field": f"{where}.labels", "message": f"task {t.name!r}: labels {t.labels} but "
                                                                     f"dataset {train.id} holds {have}"})
            ev = found.get("eval")
            extra = sorted(set(_classes(ev) or []) - set(have)) if ev is not None else []
            if extra:
                assert ev is not None
                errors.append({"field": f"{where}.data.eval", "message": f"task {t.name!r}: label set mismatch: "
                                                                        f"dataset {ev.id} holds {extra}, which "
                                                                        f"the train rows ({train.id}: {have}) "
                                                                        "never show"})
    return errors
