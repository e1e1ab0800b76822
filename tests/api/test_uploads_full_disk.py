"""An upload into a full disk (a real, small tmpfs as the blob store): 507 storage_full, nothing left behind."""

from __future__ import annotations

import contextlib
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


def test_a_submit_into_a_full_database_disk_is_507_and_records_no_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Embedded defaults with the SQLite database on a tmpfs that fills up: 507 storage_full, no Retry-After."""
    from api.main import create_app
    from migrations import upgrade
    from models.db import reset_engines
    from models.settings import get_settings
    from models.tables import Job

    with small_filesystem(tmp_path / "home", 4 * 1024 * 1024) as home:
        monkeypatch.setenv("MODELPRESS_HOME", str(home))
        for key in ("DATABASE_URL", "BROKER_URL", "STORAGE_DIR", "API_KEY"):
            monkeypatch.delenv(f"MODELPRESS_{key}", raising=False)
        monkeypatch.setenv("MODELPRESS_SUBMIT_RATE_PER_MINUTE", "0")
        get_settings.cache_clear()
        reset_engines()
        upgrade()
        model_id = builders.insert_model()
        filler = home / "filler"
        with open(filler, "wb") as fh, contextlib.suppress(OSError):  # every free byte taken
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        try:
            with TestClient(create_app(), raise_server_exceptions=False) as client:
                spec = {"model": model_id, "steps": [{"type": "quantize"}], "name": "x" * 200,
                        "metadata": {f"k{i}": "v" * 200 for i in range(30)}}
                r = client.post("/v1/jobs", json=spec)
                assert r.status_code == 507, r.text
                assert r.json()["code"] == "storage_full" and "retry-after" not in r.headers
            filler.unlink()
            with session_scope() as s:
                assert s.scalar(select(func.count()).select_from(Job)) == 0
        finally:
            reset_engines()
            get_settings.cache_clear()
