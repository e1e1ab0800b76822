"""API test fixtures: a fresh app on the session's PostgreSQL database and a private storage folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def client(pg_env: str) -> Iterator[TestClient]:
    """A TestClient for a new app; server errors come back as responses (500 problem), not exceptions."""
    from api.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def storage_dir(pg_env: str) -> Path:
    """The blob store root of this test."""
    from models.settings import get_settings

    return get_settings().blob_dir


def blobs(root: Path) -> list[Path]:
    """Every stored blob (temp files excluded)."""
    skip = {"tmp"}  # upload temp files
    return [p for p in root.rglob("*") if p.is_file() and not skip & set(p.relative_to(root).parts)]


def temp_files(root: Path) -> list[Path]:
    """Leftover upload temp files."""
    tmp = root / "tmp"
    return list(tmp.iterdir()) if tmp.exists() else []
