"""The capabilities list: every step type the job spec accepts, what it does, its form and JSON schema."""

from __future__ import annotations

import inspect

from models.schemas import PassInfo
from models.spec import STEP_KINDS


def list_passes() -> list[PassInfo]:
    """One PassInfo per step type, in the spec table's order."""
    return [
        PassInfo.model_validate(
            {
                "type": name,
                "description": inspect.cleandoc(kind.params.__doc__ or "").strip(),
                "takes": kind.takes,
                "schema": kind.params.model_json_schema(),
            }
        )
        for name, kind in STEP_KINDS.items()
    ]
