"""Submit-time check that an uploaded ONNX graph can become a torch module when a step needs one."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from api.services.lookup import find_owned
from models.convertible import newest_convertible_opset, unconvertible
from models.spec import STEP_KINDS, JobSpec
from models.tables import Model


def torch_step_errors(spec: JobSpec, model_meta: dict[str, Any]) -> list[dict[str, Any]]:
    """A field error on the first torch-form step when the ONNX model has operators onnx2torch cannot convert."""
    first = next((i for i, s in enumerate(spec.steps) if STEP_KINDS[s.type].takes == "torch"), None)
    if first is None:
        return []
    error = _error(f"steps.{first}", f"the {spec.steps[first].type!r} step", model_meta)
    return [error] if error else []


def distill_model_errors(session: Session, owner: str, spec: JobSpec) -> list[dict[str, Any]]:
    """Field errors for a distill step's teacher or student model: an ONNX upload onnx2torch cannot convert."""
    errors: list[dict[str, Any]] = []
    for i, step in enumerate(spec.steps):
        for ref in step.model_refs():
            row = find_owned(session, Model, owner, ref.model_id)
            if row is not None and row.format == "onnx":
                error = _error(f"steps.{i}.{ref.field}", ref.use, row.meta or {})
                if error:
                    errors.append(error)
    return errors


def _error(field: str, use: str, model_meta: dict[str, Any]) -> dict[str, Any] | None:
    op_types = model_meta.get("op_types")
    opset = model_meta.get("opset")
    if not op_types or not isinstance(opset, int):
        return None
    missing = unconvertible(op_types, opset)
    if not missing:
        return None
    ops = ", ".join(missing)
    lower = newest_convertible_opset(op_types, opset)
    fix = (
        f"re-export it at opset {lower} (torch.onnx.export(..., opset_version={lower}, dynamo=False))"
        if lower is not None
        else "re-export it without those operators"
    )
    message = (
        f"the model's ONNX graph (opset {opset}) uses {ops}, which cannot be converted to PyTorch for "
        f"{use}; {fix}, or keep to steps that work on the ONNX graph (quantize)"
    )
    return {"field": field, "message": message}
