"""Uploaded models and datasets: cursor-paginated lists and their response bodies."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.services.pagination import paginate
from models.schemas import DatasetOut, ModelOut, Page
from models.tables import Dataset, Model

_MODEL_TOP = ("inputs", "outputs")
_DATASET_TOP = ("num_samples", "fields", "classes")

Row = TypeVar("Row", Model, Dataset)


def _file_fields(row: Model | Dataset, top: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The columns both bodies share (``meta`` without the ``top`` keys), and the full ``meta``."""
    meta: dict[str, Any] = dict(row.meta or {})
    common = {
        "id": row.id,
        "name": row.name,
        "format": row.format,
        "sha256": row.sha256,
        "size_bytes": row.size_bytes,
        "meta": {k: v for k, v in meta.items() if k not in top},
        "created_at": row.created_at,
    }
    return common, meta


def model_out(row: Model) -> ModelOut:
    """The response body of a model row (inputs/outputs lifted out of ``meta``)."""
    common, meta = _file_fields(row, _MODEL_TOP)
    return ModelOut(**common, inputs=meta.get("inputs") or [], outputs=meta.get("outputs") or [])


def dataset_out(row: Dataset) -> DatasetOut:
    """The response body of a dataset row (sample count, fields and classes lifted out of ``meta``)."""
    common, meta = _file_fields(row, _DATASET_TOP)
    return DatasetOut(
        **common,
        num_samples=int(meta.get("num_samples") or 0),
        fields=meta.get("fields") or {},
        classes=meta.get("classes"),
    )


def newest_first(
    session: Session, table: type[Row], owner: str, after: str | None, limit: int, sha256: str | None = None
) -> tuple[list[Row], str | None]:
    """One page of ``table`` rows, newest first (optionally only those with ``sha256``); cursor = last id."""
    query = select(table).where(table.owner == owner)
    if sha256:
        query = query.where(table.sha256 == sha256.lower())
    return paginate(session, query, table.id, after, limit)


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
