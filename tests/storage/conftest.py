"""Storage fixtures: the in-memory store selected as the configured backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.storage import memory


@pytest.fixture
def memory_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[memory.MemoryBlobStore]:
    """A MemoryBlobStore that ``get_store()`` returns for this test (MODELPRESS_STORAGE_URL=memory://test)."""
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
    yield memory.install(monkeypatch, tmp_path / "staging")
    get_settings.cache_clear()
