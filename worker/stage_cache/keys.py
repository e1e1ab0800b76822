"""Stage-cache keys: a canonical JSON of everything that determines a prefix's output (or a whole job's), hashed."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from typing import Any

from sqlalchemy import select

from models.db import session_scope
from models.spec import JobSpec
from models.tables import Dataset, Model

STAGE, JOB, RUN = "stage", "job", "run"


def marker_key(key: str) -> str:
    """The marker key of a step key being computed."""
    return hashlib.sha256(f"run:{key}".encode()).hexdigest()


def modelpress_version() -> str:
    """The installed modelpress version (part of every key)."""
    try:
        return importlib.metadata.version("modelpress")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"




def db_shas(spec: JobSpec) -> dict[str, str]:
    """``{id: sha256}`` of the models and datasets the job reads, from their rows."""
    models, datasets = spec.model_ids(), spec.dataset_ids()
    with session_scope() as s:
        rows = list(s.execute(select(Model.id, Model.sha256).where(Model.id.in_(models))))
        rows += list(s.execute(select(Dataset.id, Dataset.sha256).where(Dataset.id.in_(datasets))))
    return {rid: sha for rid, sha in rows}


def _digest(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _base(spec: JobSpec, shas: dict[str, str], device: str) -> dict[str, Any]:
    """What every key shares: inputs by content (ids never matter), seed, preprocessing, version."""
    def sha(ref: str | None) -> str | None:
        if ref is None:
            return None
        if ref not in shas:
            raise KeyError(f"no sha256 for {ref!r}")
        return shas[ref]

    return {
        "version": modelpress_version(),
        "model": sha(spec.model),
        "data": {role: sha(getattr(spec.data, role)) for role in ("train", "eval", "calibration")},
        "task": spec.task,
        "seed": spec.seed,
        "text": spec.text.model_dump(mode="json"),
        "image": spec.image.model_dump(mode="json"),
        "evaluate": spec.evaluate.model_dump(mode="json"),
        "opset": spec.export.opset,
        "device": device,
        # eval rows carved for calibration (worker.context) measure on fewer rows: not the same stage
        **({"eval_carved_for_calibration": True} if spec.carves_calibration() else {}),
    }


def _step_doc(spec: JobSpec, i: int, shas: dict[str, str]) -> dict[str, Any]:
    doc = spec.steps[i].model_dump(mode="json")
    # a model a step refers to (a distillation's teacher or student) is named by id: key it by its bytes instead
    for ref in spec.steps[i].model_refs():
        *parents, last = ref.field.split(".")
        where = doc
        for part in parents:
            where[part] = where = dict(where[part])
        where[last] = shas[ref.model_id]
    return doc


def stage_key(spec: JobSpec, i: int, shas: dict[str, str], device: str) -> str:
    """The key of the working model after ``spec.steps[0..i]``."""
    return _digest({"kind": STAGE, **_base(spec, shas, device),
                    "steps": [_step_doc(spec, j, shas) for j in range(i + 1)]})


def job_key(spec: JobSpec, shas: dict[str, str], device: str) -> str:
    """The key of the whole job: every step, export and evaluation setting (``cache`` and ``queue`` aside:
    the device is in the key)."""
    rest = spec.model_dump(mode="json", exclude={"model", "data", "steps", "cache", "queue"})
    return _digest({"kind": JOB, **_base(spec, shas, device), "spec": rest,
                    "steps": [_step_doc(spec, j, shas) for j in range(len(spec.steps))]})


