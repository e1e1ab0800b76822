"""Capabilities: the step types a job spec accepts, each with its JSON schema."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import Owner
from api.services.passes import list_passes
from models.schemas import PassInfo

router = APIRouter(prefix="/v1/passes", tags=["passes"])


@router.get("", response_model=list[PassInfo])
def get_passes(owner: Owner) -> list[PassInfo]:
    """Every pass: type, description, the model form it takes, and its parameter schema."""
    return list_passes()
