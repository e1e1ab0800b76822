"""The capabilities list: every step type the job spec accepts, what it does, its form and JSON schema."""

from __future__ import annotations

import inspect

from models.schemas import PassInfo
from models.spec import STEP_FORMS, STEP_MODELS


def _step_type(model: type) -> str:
    return str(model.model_fields["type"].annotation.__args__[0])  # type: ignore[attr-defined]


def list_passes() -> list[PassInfo]:
    """One PassInfo per step model, in the union's order."""
    out = []
    for model in STEP_MODELS:
        step = _step_type(model)
        out.append(
            PassInfo.model_validate(
                {
                    "type": step,
                    "description": inspect.cleandoc(model.__doc__ or "").strip(),
                    "takes": STEP_FORMS.get(step, "onnx"),
                    "schema": model.model_json_schema(),
                }
            )
        )
    return out
