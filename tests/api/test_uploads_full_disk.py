"""An upload into a full disk (a real, small tmpfs as the blob store): 507 storage_full, nothing left behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from models.db import session_scope
from models.tables import Model
from tests.api import builders
from tests.api.conftest import blobs, temp_files
from tests.factories_disk import small_filesystem


def _model_rows() -> int:
    with session_scope() as s:
        return int(s.scalar(select(func.count()).select_from(Model)) or 0)


@pytest.fixture
def full_store(pg_env: str, request: pytest.FixtureRequest) -> Iterator[tuple[TestClient, Path]]:
    """An app whose blob store is a tmpfs of 1 MiB, or (``inodes`` param) of room for one staged file only."""
    from api.main import create_app
    from models.settings import get_settings

    inodes = getattr(request, "param", None)
    with (small_filesystem(get_settings().blob_dir, 1024 * 1024, inodes=inodes) as root,
          TestClient(create_app(), raise_server_exceptions=False) as c):
        yield c, root


def _assert_storage_full(r: Any, root: Path) -> None:
    assert r.status_code == 507, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == "storage_full" and "no space left" in body["detail"]
    assert _model_rows() == 0 and temp_files(root) == [] and blobs(root) == []


def test_staging_into_a_full_disk_is_507_and_leaves_nothing(full_store: tuple[TestClient, Path]) -> None:
    client, root = full_store
    big = b"\x00" * (2 * 1024 * 1024)  # twice the filesystem: the staging write runs out of space
    _assert_storage_full(client.put("/v1/models", params={"format": "onnx"}, content=big), root)
    r = client.post("/v1/models", files={"file": ("m.onnx", big)}, data={"format": "onnx"})
    _assert_storage_full(r, root)
    # Once the bytes fit, the same store takes an upload: the failure left nothing that blocks it.
    ok = client.put("/v1/models", params={"format": "onnx"}, content=builders.onnx_bytes(in_features=4, out_features=3))
    assert ok.status_code == 201, ok.text


# Inodes: the root, tmp/, the staged file; the blob's folders find none left (a real ENOSPC at commit).
@pytest.mark.parametrize("full_store", [3], indirect=True)
def test_a_commit_into_a_full_disk_is_507_and_leaves_nothing(full_store: tuple[TestClient, Path]) -> None:
    client, root = full_store
    data = builders.onnx_bytes(in_features=4, out_features=3)  # valid: inspected, then the commit fails
    _assert_storage_full(client.put("/v1/models", params={"format": "onnx"}, content=data), root)
