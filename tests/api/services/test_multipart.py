"""The streaming multipart parser, through the upload endpoints: field order, the file part, media type,
limits. Every refusal is a problem+json, stores no blob, records no row and leaves no temp file."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from models.db import session_scope
from models.tables import Model
from tests.api import builders
from tests.api.conftest import blobs, temp_files

BOUNDARY = "mpTestBoundary42"
CTYPE = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def _part(name: str, data: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"


def _body(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def _rows() -> int:
    with session_scope() as s:
        return int(s.scalar(select(func.count()).select_from(Model)) or 0)


def _nothing_left(storage_dir: Path) -> bool:
    return _rows() == 0 and blobs(storage_dir) == [] and temp_files(storage_dir) == []


def _is_problem(r: httpx.Response, status: int, code: str) -> bool:
    return (
        r.status_code == status
        and r.headers["content-type"].startswith("application/problem+json")
        and r.json()["code"] == code
        and r.json()["status"] == status
    )


@pytest.mark.parametrize("file_first", [True, False])
def test_fields_before_or_after_the_file(client: TestClient, file_first: bool) -> None:
    data = builders.onnx_bytes(in_features=3)
    file_part = _part("file", data, filename="net.onnx")
    fields = [_part("name", b"ordered"), _part("format", b"onnx")]
    body = _body(file_part, *fields) if file_first else _body(*fields, file_part)
    r = client.post("/v1/models", content=body, headers=CTYPE)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "ordered" and r.json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert r.json()["inputs"][0]["shape"] == ["batch", 3]


def test_the_filename_names_the_record_when_no_name_is_sent(client: TestClient) -> None:
    body = _body(_part("format", b"onnx"), _part("file", builders.onnx_bytes(), filename="x" * 300 + ".onnx"))
    r = client.post("/v1/models", content=body, headers=CTYPE)
    assert r.status_code == 201 and r.json()["name"] == "x" * 255


def test_missing_file_part(client: TestClient, storage_dir: Path) -> None:
    r = client.post("/v1/models", content=_body(_part("format", b"onnx"), _part("name", b"n")), headers=CTYPE)
    assert _is_problem(r, 422, "validation_error")
    assert r.json()["errors"] == [{"field": "file", "message": "the multipart body has no 'file' part"}]
    assert _nothing_left(storage_dir)


def test_two_file_parts(client: TestClient, storage_dir: Path) -> None:
    data = builders.onnx_bytes()
    body = _body(_part("file", data, "a.onnx"), _part("file", data, "b.onnx"), _part("format", b"onnx"))
    r = client.post("/v1/models", content=body, headers=CTYPE)
    assert _is_problem(r, 422, "validation_error") and r.json()["errors"][0]["field"] == "file"
    assert _nothing_left(storage_dir)


@pytest.mark.parametrize(
    "content_type",
    ["application/octet-stream", "multipart/form-data", "multipart/mixed; boundary=x", "application/json"],
)
def test_wrong_content_type(client: TestClient, storage_dir: Path, content_type: str) -> None:
    r = client.post("/v1/models", content=builders.onnx_bytes(), headers={"content-type": content_type})
    assert _is_problem(r, 415, "unsupported_media_type") and "multipart/form-data" in r.json()["detail"]
    assert _nothing_left(storage_dir)


def test_oversized_chunked_body(client: TestClient, storage_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_MAX_UPLOAD_BYTES", "4096")
    get_settings.cache_clear()
    body = _body(_part("format", b"onnx"), _part("file", b"w" * 20_000, "big.onnx"))

    def chunks() -> Iterator[bytes]:  # no Content-Length: only counting streamed bytes catches it
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    r = client.post("/v1/models", content=chunks(), headers=CTYPE)
    assert _is_problem(r, 413, "upload_too_large") and "4096" in r.json()["detail"]
    assert _nothing_left(storage_dir)


def test_declared_length_far_over_the_limit_is_refused_before_reading(
    client: TestClient, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.services.multipart import MAX_FIELD_BYTES
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_MAX_UPLOAD_BYTES", "1000")
    get_settings.cache_clear()
    body = _body(_part("format", b"onnx"), _part("file", b"w" * (1000 + 8 * MAX_FIELD_BYTES), "big.onnx"))
    r = client.post("/v1/models", content=body, headers=CTYPE)
    assert _is_problem(r, 413, "upload_too_large")
    assert _nothing_left(storage_dir)


def test_an_oversized_text_field(client: TestClient, storage_dir: Path) -> None:
    from api.services.multipart import MAX_FIELD_BYTES

    body = _body(_part("name", b"n" * (MAX_FIELD_BYTES + 1)), _part("file", builders.onnx_bytes(), "m.onnx"))
    r = client.post("/v1/models", content=body, headers=CTYPE)
    assert _is_problem(r, 422, "validation_error")
    assert r.json()["errors"] == [{"field": "name", "message": "form field too large"}]
    assert _nothing_left(storage_dir)


def test_a_malformed_body(client: TestClient, storage_dir: Path) -> None:
    body = f"--{BOUNDARY}\r\nthis line is no header\r\n\r\n".encode() + b"x" * 100
    r = client.post("/v1/models", content=body, headers=CTYPE)
    assert _is_problem(r, 400, "bad_request") and "malformed multipart body" in r.json()["detail"]
    assert _nothing_left(storage_dir)
