"""Uploads: stream the body (raw or multipart) into the blob store, inspect it, record it once per owner.

The byte count is enforced while the body is staged into a temp file (a Content-Length check alone is
bypassed by a chunked body); over the limit the temp file is removed and nothing is recorded. The staged
file is inspected before it is committed to the store, so bytes that fail inspection are never stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api import inspection
from api.errors import ProblemError, field_error
from api.services import quotas
from api.services.multipart import MAX_FIELD_BYTES, MultipartStream
from api.services.numbers import length_over
from models import blobs
from models.db import is_transient, retry_transient, session_scope
from models.ids import new_id
from models.settings import Settings, get_settings
from models.tables import Dataset, Model
from storage import get_store
from storage.base import BlobStore, Staged, UploadTooLarge

log = logging.getLogger("modelpress.api.uploads")

Kind = Literal["model", "dataset"]
TABLES: dict[str, type[Model] | type[Dataset]] = {"model": Model, "dataset": Dataset}
# The formats an upload may declare are the ones with an inspector (api/inspection/__init__.py).
INSPECTORS: dict[str, dict[str, Callable[..., dict[str, Any]]]] = {
    "model": inspection.MODEL_INSPECTORS,
    "dataset": inspection.DATASET_INSPECTORS,
}
FORMATS: dict[str, tuple[str, ...]] = {kind: tuple(by_format) for kind, by_format in INSPECTORS.items()}
ERROR_CODES = {"model": "invalid_model", "dataset": "invalid_dataset"}
MAX_NAME = 255


@dataclass
class Uploaded:
    """The outcome of an upload: the row (new or existing) and whether it was created now."""

    row: Model | Dataset
    created: bool


def check_format(kind: Kind, fmt: str | None) -> str:
    """The declared format if this kind accepts it, else 422 naming ``format``."""
    allowed = FORMATS[kind]
    if not fmt:
        raise field_error(422, "validation_error", "format", f"required; one of {', '.join(allowed)}")
    if fmt not in allowed:
        raise field_error(422, "validation_error", "format", f"{fmt!r} is not one of {', '.join(allowed)}")
    return fmt


def check_name(name: str | None) -> str | None:
    """A display name of at most 255 characters (never used as a path)."""
    if name is not None and len(name) > MAX_NAME:
        raise field_error(422, "validation_error", "name", f"at most {MAX_NAME} characters")
    if name is None:
        return None
    if "\x00" in name:
        # PostgreSQL text cannot hold NUL: refused here, before a byte is stored, not as a 500 at insert.
        raise field_error(422, "validation_error", "name", "must not contain NUL characters")
    return name.strip() or None


def check_declared_length(request: Request, overhead: int = 0) -> None:
    """Refuse at once a body whose Content-Length already says it is over the limit (plus ``overhead``)."""
    limit = get_settings().max_upload_bytes
    declared = request.headers.get("content-length")
    if limit is not None and length_over(declared, limit + overhead):
        raise UploadTooLarge(limit)


# How long an upload whose bytes are already stored waits for the database to come back before it gives up.
INSERT_RETRY_S = 10.0


def _existing(kind: Kind, owner: str, sha256: str) -> Model | Dataset | None:
    with session_scope() as session:
        if kind == "model":
            return session.scalars(select(Model).where(Model.owner == owner, Model.sha256 == sha256)).first()
        return session.scalars(select(Dataset).where(Dataset.owner == owner, Dataset.sha256 == sha256)).first()


def record(
    kind: Kind, store: BlobStore, staged: Staged, owner: str, name: str | None, fmt: str | None
) -> Uploaded:
    """Inspect a staged upload, commit it to the store and insert its row; same bytes, same owner: the existing row.

    Nothing is committed before the upload is known to be good, so a rejected upload never touches
    stored blobs. Concurrent uploads of the same bytes both commit (content-addressed: the same blob)
    and race to insert; the unique constraint (owner, sha256) settles it and the loser answers with the
    winner's row."""
    fmt = check_format(kind, fmt)
    name = check_name(name)
    found = _existing(kind, owner, staged.sha256)
    if found is not None:
        return Uploaded(_same_format(found, kind, fmt), created=False)
    settings = get_settings()
    with session_scope() as session:  # refused before anything is stored; checked again at the insert
        quotas.check_storage(session, owner, staged.size_bytes, settings)
    meta = _inspect(kind, fmt, staged)
    # A write claim on the key keeps a concurrent sweep (models/blobs.py) from removing the blob
    # between its commit and the insert of the row that refers to it.
    with blobs.writing(staged.sha256):
        was_stored = store.exists(staged.sha256)
        blob = store.commit(staged)
        table = TABLES[kind]
        prefix = "mdl" if kind == "model" else "ds"
        row = table(
            id=new_id(prefix),
            owner=owner,
            name=name or f"{kind}-{blob.sha256[:12]}",
            format=fmt,
            sha256=blob.sha256,
            size_bytes=blob.size_bytes,
            storage_key=blob.key,
            meta=meta,
        )
        try:
            _insert(row, owner, settings)
        except IntegrityError:
            # A concurrent upload of the same bytes won the race: answer with its row (it holds the blob).
            found = _existing(kind, owner, blob.sha256)
            if found is None:
                raise
            return Uploaded(_same_format(found, kind, fmt), created=False)
        except Exception as exc:
            if not is_transient(exc):
                raise
            # The database went away after the blob was stored: take back a blob this upload added (no record
            # can refer to it, the insert never happened), then answer 503 (api.errors) so the client retries.
            if not was_stored:
                store.delete(blob.key)
            raise
    return Uploaded(row, created=True)


def _same_format(found: Model | Dataset, kind: Kind, fmt: str) -> Model | Dataset:
    """The earlier record of these bytes when it has the declared format; else a 409 naming both formats (one
    record per bytes and owner: read as another format they would be another model, so it is not silently the
    earlier one)."""
    if found.format == fmt:
        return found
    raise ProblemError(
        409, "format_conflict",
        f"these bytes are already {kind} {found.id} ({found.name!r}) with format {found.format!r}, not {fmt!r}; "
        f"use {found.id} as it is, or delete it (DELETE /v1/{kind}s/{found.id}) and upload again as {fmt!r}",
    )


def _insert(row: Model | Dataset, owner: str, settings: Settings) -> None:
    def once() -> None:
        with session_scope() as session:  # rolls back when the insert fails
            quotas.check_storage(session, owner, row.size_bytes, settings, lock=True)
            session.add(row)

    retry_transient(INSERT_RETRY_S)(once)()


def _inspect(kind: Kind, fmt: str, staged: Staged) -> dict[str, Any]:
    inspector = INSPECTORS[kind][fmt]
    try:
        return inspector(staged.path)
    except inspection.InspectionError as exc:
        raise ProblemError(422, ERROR_CODES[kind], f"not a valid {fmt} {kind}: {exc}") from exc
    except Exception as exc:
        # Bad input must never become a 500: anything the parser trips on is the upload's fault.
        log.warning("inspection of %s %s (%s) failed", kind, staged.sha256, fmt, exc_info=True)
        raise ProblemError(
            422, ERROR_CODES[kind], f"not a valid {fmt} {kind}: the file could not be read ({type(exc).__name__})"
        ) from exc


async def _receive(
    kind: Kind, chunks: AsyncIterator[bytes], owner: str, fields: Callable[[], tuple[str | None, str | None]]
) -> Uploaded:
    """Stage the body (counting bytes against the limit), then record it in a thread; the temp file goes either way.

    ``fields`` gives ``(name, format)`` once the whole body is read (a multipart body may send them last)."""
    store = get_store()
    async with store.stage_async(chunks, get_settings().max_upload_bytes) as staged:
        name, fmt = fields()
        return await asyncio.get_running_loop().run_in_executor(
            None, record, kind, store, staged, owner, name, fmt
        )


async def upload_raw(request: Request, kind: Kind, owner: str, name: str | None, fmt: str | None) -> Uploaded:
    """A raw-body upload (PUT): the format is checked before a byte is read."""
    fmt = check_format(kind, fmt)
    name = check_name(name)
    check_declared_length(request)
    return await _receive(kind, request.stream(), owner, lambda: (name, fmt))


async def upload_multipart(request: Request, kind: Kind, owner: str) -> Uploaded:
    """A multipart upload (POST, ``curl -F file=@m.onnx -F name=... -F format=onnx``), streamed."""
    stream = MultipartStream(request)
    check_declared_length(request, overhead=8 * MAX_FIELD_BYTES)

    def fields() -> tuple[str | None, str | None]:  # every part is parsed by the time the body ends
        name = stream.fields.get("name") or stream.filename
        if name and len(name) > MAX_NAME:
            name = name[:MAX_NAME]
        return name, stream.fields.get("format")

    return await _receive(kind, stream.file_chunks(), owner, fields)
