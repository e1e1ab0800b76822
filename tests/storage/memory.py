"""An in-memory blob store: the test double proving API and worker code need no local blob paths."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import BinaryIO

import pytest

from storage.base import BlobNotFound, BlobStore, Staged, StoredBlob, check_key


class MemoryBlobStore(BlobStore):
    """Blobs in a dict; uploads are staged in a temp folder (as any backend's are), then read into memory."""

    def __init__(self, staging_dir: Path | None = None) -> None:
        super().__init__(staging_dir)
        self.blobs: dict[str, bytes] = {}
        self.copies: list[Path] = []  # every local_copy handed out
        self.healthy = True
        self._lock = threading.Lock()

    def commit(self, staged: Staged) -> StoredBlob:
        check_key(staged.sha256)
        data = staged.path.read_bytes()
        staged.path.unlink()
        with self._lock:
            self.blobs.setdefault(staged.sha256, data)
        return StoredBlob(staged.sha256, staged.sha256, staged.size_bytes)

    def _get(self, key: str) -> bytes:
        try:
            return self.blobs[check_key(key)]
        except KeyError:
            raise BlobNotFound(key) from None

    def open(self, key: str) -> BinaryIO:
        return io.BytesIO(self._get(key))

    def local_copy(self, key: str, dest_dir: Path) -> Path:
        dest_dir.mkdir(parents=True, exist_ok=True)
        path = dest_dir / check_key(key)
        path.write_bytes(self._get(key))
        self.copies.append(path)
        return path

    def exists(self, key: str) -> bool:
        return check_key(key) in self.blobs

    def size(self, key: str) -> int:
        return len(self._get(key))

    def delete(self, key: str) -> None:
        with self._lock:
            self.blobs.pop(check_key(key), None)

    def check(self) -> None:
        if not self.healthy:
            raise ConnectionError("memory store marked unhealthy")


def install(monkeypatch: pytest.MonkeyPatch, staging_dir: Path) -> MemoryBlobStore:
    """Register a new MemoryBlobStore as the ``memory://`` backend and select it by MODELPRESS_STORAGE_URL."""
    from models.settings import get_settings
    from storage import backends

    store = MemoryBlobStore(staging_dir)
    monkeypatch.setitem(backends.BACKENDS, "memory", lambda _url: store)
    monkeypatch.setattr(backends, "_STORES", {})
    monkeypatch.setenv("MODELPRESS_STORAGE_URL", "memory://test")
    get_settings.cache_clear()
    return store
