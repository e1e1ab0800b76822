"""Uploads: stream the body (raw or multipart) into the blob store, inspect it, record it once per owner.

The byte count is enforced while the body is staged into a temp file (a Content-Length check alone is
bypassed by a chunked body); over the limit the temp file is removed and nothing is recorded. The staged
file is inspected before it is committed to the store, so bytes that fail inspection are never stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api import inspection
from api.errors import ProblemError, field_error
from models.db import session_scope
from models.ids import new_id
from models.settings import get_settings
from models.tables import Dataset, Model
from storage import get_store
from storage.base import BlobStore, Staged, UploadTooLarge

log = logging.getLogger("modelpress.api.uploads")

Kind = Literal["model", "dataset"]
FORMATS: dict[str, tuple[str, ...]] = {"model": ("onnx", "hf"), "dataset": ("npz", "imagefolder", "text")}
TABLES: dict[str, type[Model] | type[Dataset]] = {"model": Model, "dataset": Dataset}
INSPECTORS: dict[str, dict[str, Callable[..., dict[str, Any]]]] = {
    "model": inspection.MODEL_INSPECTORS,
    "dataset": inspection.DATASET_INSPECTORS,
}
ERROR_CODES = {"model": "invalid_model", "dataset": "invalid_dataset"}
MAX_NAME = 255
MAX_FIELD_BYTES = 64 * 1024


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
    if declared and declared.isdigit() and int(declared) > limit + overhead:
        raise UploadTooLarge(limit)


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
        return Uploaded(found, created=False)
    meta = _inspect(kind, fmt, staged)
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
        with session_scope() as session:  # rolls back when the insert fails
            session.add(row)
    except IntegrityError:
        # A concurrent upload of the same bytes won the race: answer with its row (it holds the blob).
        found = _existing(kind, owner, blob.sha256)
        if found is None:
            raise
        return Uploaded(found, created=False)
    return Uploaded(row, created=True)


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


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    is_file: bool = False


class MultipartStream:
    """Parses a multipart/form-data body as it streams: yields the ``file`` part, keeps small text fields."""

    def __init__(self, request: Request, file_field: str = "file") -> None:
        ctype, params = parse_options_header(request.headers.get("content-type", ""))
        if ctype != b"multipart/form-data" or b"boundary" not in params:
            raise ProblemError(
                415, "unsupported_media_type", "send multipart/form-data with a 'file' part (curl -F file=@PATH)"
            )
        self.request = request
        self.file_field = file_field
        self.boundary = params[b"boundary"]
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.saw_file = False
        self._pending: list[bytes] = []
        self._part = _Part()
        self._header_field = bytearray()
        self._header_value = bytearray()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._part.headers[self._header_field.decode("latin-1").lower()] = self._header_value.decode("latin-1")
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _disp, params = parse_options_header(self._part.headers.get("content-disposition", ""))
        part = self._part
        part.name = params.get(b"name", b"").decode("utf-8", "replace")
        raw_filename = params.get(b"filename")
        part.filename = raw_filename.decode("utf-8", "replace") if raw_filename is not None else None
        if part.name == self.file_field:
            if self.saw_file:
                raise ProblemError(422, "validation_error", "file: send exactly one 'file' part",
                                   errors=[{"field": "file", "message": "send exactly one 'file' part"}])
            part.is_file = True
            self.saw_file = True
            self.filename = part.filename

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part.is_file:
            self._pending.append(bytes(data[start:end]))
            return
        self._part.data += data[start:end]
        if len(self._part.data) > MAX_FIELD_BYTES:
            raise field_error(422, "validation_error", self._part.name or "form", "form field too large")

    def _on_part_end(self) -> None:
        part = self._part
        if not part.is_file and part.name:
            self.fields[part.name] = part.data.decode("utf-8", "replace")
        self._part = _Part()

    def _on_part_begin(self) -> None:
        self._part = _Part()

    async def file_chunks(self) -> AsyncIterator[bytes]:
        """The bytes of the ``file`` part as they arrive; afterwards ``fields`` holds the other parts."""
        parser = MultipartParser(
            self.boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
            },
        )
        async for chunk in self.request.stream():
            try:
                parser.write(chunk)
            except ProblemError:
                raise
            except Exception as exc:
                raise ProblemError(400, "bad_request", f"malformed multipart body: {exc}") from exc
            while self._pending:
                yield self._pending.pop(0)
        parser.finalize()
        while self._pending:
            yield self._pending.pop(0)
        if not self.saw_file:
            raise field_error(422, "validation_error", "file", "the multipart body has no 'file' part")


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
