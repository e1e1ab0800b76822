"""The local blob store: content addressing, atomic writes, limits that leave nothing behind."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from storage.base import UploadTooLarge
from storage.local import LocalBlobStore


def _chunks(data: bytes, size: int = 1000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_put_is_content_addressed_and_deduplicated(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    data = b"modelpress" * 5000
    a = store.put(_chunks(data))
    b = store.put(_chunks(data, 777))
    assert a == b
    assert a.sha256 == hashlib.sha256(data).hexdigest() and a.size_bytes == len(data)
    assert store.path(a.key).read_bytes() == data
    assert store.path(a.key).relative_to(tmp_path).parts[:2] == (a.key[:2], a.key[2:4])
    assert list(store.tmp.iterdir()) == []


def test_put_over_limit_leaves_no_file(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    with pytest.raises(UploadTooLarge):
        store.put(_chunks(b"x" * 10_001), limit=10_000)
    assert list(store.tmp.iterdir()) == []
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_put_async_matches_put(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    data = bytes(range(256)) * 9000

    async def body() -> AsyncIterator[bytes]:
        for chunk in _chunks(data, 65536):
            yield chunk

    blob = anyio.run(store.put_async, body())
    assert blob.sha256 == hashlib.sha256(data).hexdigest()
    assert store.exists(blob.key)
    with store.open(blob.key) as fh:
        assert fh.read() == data
    store.delete(blob.key)
    assert not store.exists(blob.key)


def test_keys_that_are_not_hashes_are_refused(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    for bad in ("../etc/passwd", "a" * 63, "G" * 64):
        with pytest.raises(KeyError):
            store.path(bad)


def test_put_async_then_runs_under_the_key_lock(tmp_path: Path) -> None:
    """``then`` sees the committed blob, and another holder of the key's lock waits for it to finish."""
    import fcntl

    store = LocalBlobStore(tmp_path)
    data = b"locked" * 1000
    seen: list[bool] = []

    def then(blob: object) -> str:
        lock = tmp_path / "locks" / f"{hashlib.sha256(data).hexdigest()[:2]}.lock"
        with open(lock, "a+b") as fh:  # a second, independent open file: flock must refuse it now
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append(False)
            except BlockingIOError:
                seen.append(True)
        assert store.exists(hashlib.sha256(data).hexdigest())
        return "indexed"

    async def body() -> AsyncIterator[bytes]:
        yield data

    assert anyio.run(store.put_async_then, body(), None, then) == "indexed"
    assert seen == [True]
