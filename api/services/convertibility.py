"""Submit-time check that an uploaded ONNX graph can become a torch module when a step needs one."""

from __future__ import annotations

from typing import Any

from models.convertible import newest_convertible_opset, unconvertible
from models.spec import STEP_KINDS, JobSpec


def torch_step_errors(spec: JobSpec, model_meta: dict[str, Any]) -> list[dict[str, Any]]:
    """A field error on the first torch-form step when the ONNX model has operators onnx2torch cannot convert."""
    first = next((i for i, s in enumerate(spec.steps) if STEP_KINDS[s.type].takes == "torch"), None)
    op_types = model_meta.get("op_types")
    opset = model_meta.get("opset")
    if first is None or not op_types or not isinstance(opset, int):
        return []
    missing = unconvertible(op_types, opset)
    if not missing:
        return []
    step = spec.steps[first].type
    ops = ", ".join(missing)
    lower = newest_convertible_opset(op_types, opset)
    fix = (
        f"re-export it at opset {lower} (torch.onnx.export(..., opset_version={lower}, dynamo=False))"
        if lower is not None
        else "re-export it without those operators"
    )
    message = (
        f"the model's ONNX graph (opset {opset}) uses {ops}, which cannot be converted to PyTorch for the "
        f"{step!r} step; {fix}, or keep to steps that work on the ONNX graph (quantize)"
    )
    return [{"field": f"steps.{first}", "message": message}]
