"""Uploaded models and datasets: look-ups, cursor-paginated lists, and their response bodies."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import ProblemError, not_found
from models.schemas import DatasetOut, ModelOut, Page
from models.tables import Dataset, Model

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
_MODEL_TOP = ("inputs", "outputs")
_DATASET_TOP = ("num_samples", "fields", "classes")

Row = TypeVar("Row", Model, Dataset)


def model_out(row: Model) -> ModelOut:
    """The response body of a model row (inputs/outputs lifted out of ``meta``)."""
    meta: dict[str, Any] = dict(row.meta or {})
    return ModelOut(
        id=row.id,
        name=row.name,
        format=row.format,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        inputs=meta.get("inputs") or [],
        outputs=meta.get("outputs") or [],
        meta={k: v for k, v in meta.items() if k not in _MODEL_TOP},
        created_at=row.created_at,
    )


def dataset_out(row: Dataset) -> DatasetOut:
    """The response body of a dataset row (sample count, fields and classes lifted out of ``meta``)."""
    meta: dict[str, Any] = dict(row.meta or {})
    return DatasetOut(
        id=row.id,
        name=row.name,
        format=row.format,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        num_samples=int(meta.get("num_samples") or 0),
        fields=meta.get("fields") or {},
        classes=meta.get("classes"),
        meta={k: v for k, v in meta.items() if k not in _DATASET_TOP},
        created_at=row.created_at,
    )


def check_limit(limit: int) -> int:
    """A page size within 1..MAX_LIMIT, else 422 naming ``limit``."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ProblemError(
            422,
            "validation_error",
            f"limit: must be between 1 and {MAX_LIMIT}",
            errors=[{"field": "limit", "message": f"must be between 1 and {MAX_LIMIT}"}],
        )
    return limit


def newest_first(
    session: Session, table: type[Row], owner: str, after: str | None, limit: int, sha256: str | None = None
) -> tuple[list[Row], str | None]:
    """One page of ``table`` rows, newest first (optionally only those with ``sha256``); cursor = last id."""
    check_limit(limit)
    query = select(table).where(table.owner == owner)
    if sha256:
        query = query.where(table.sha256 == sha256.lower())
    if after:
        query = query.where(table.id < after)
    rows = list(session.scalars(query.order_by(table.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more and rows else None)


def get_model(session: Session, owner: str, model_id: str) -> Model:
    """The owner's model, or 404."""
    row = session.get(Model, model_id)
    if row is None or row.owner != owner:
        raise not_found("model", model_id)
    return row


def get_dataset(session: Session, owner: str, dataset_id: str) -> Dataset:
    """The owner's dataset, or 404."""
    row = session.get(Dataset, dataset_id)
    if row is None or row.owner != owner:
        raise not_found("dataset", dataset_id)
    return row


def list_models(
    session: Session, owner: str, after: str | None, limit: int, sha256: str | None = None
) -> Page[ModelOut]:
    """A page of the owner's models, newest first (``sha256`` finds the record of known bytes)."""
    rows, cursor = newest_first(session, Model, owner, after, limit, sha256)
    return Page[ModelOut](data=[model_out(r) for r in rows], next_cursor=cursor)


def list_datasets(
    session: Session, owner: str, after: str | None, limit: int, sha256: str | None = None
) -> Page[DatasetOut]:
    """A page of the owner's datasets, newest first (``sha256`` finds the record of known bytes)."""
    rows, cursor = newest_first(session, Dataset, owner, after, limit, sha256)
    return Page[DatasetOut](data=[dataset_out(r) for r in rows], next_cursor=cursor)
