"""The local blob store: content addressing, atomic writes, limits that leave nothing behind, file URLs."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from storage.base import BlobNotFound, StorageConfigError, UploadTooLarge
from storage.local import LocalBlobStore, from_url


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


def test_a_staged_upload_lives_in_the_temp_folder_until_committed(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    data = b"staged" * 1000
    with store.stage(_chunks(data)) as staged:
        assert staged.path.parent == store.tmp and staged.path.read_bytes() == data
        assert not store.exists(staged.key)  # inspected before it is stored
        blob = store.commit(staged)
        assert not staged.path.exists()
    assert store.path(blob.key).read_bytes() == data and list(store.tmp.iterdir()) == []
    with store.stage(_chunks(b"rejected")) as staged:
        key = staged.key
    assert not store.exists(key) and list(store.tmp.iterdir()) == []


def test_local_copy_is_the_stored_file_itself(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    blob = store.put([b"weights"])
    copy = store.local_copy(blob.key, tmp_path / "work")
    assert copy == store.path(blob.key) and copy.read_bytes() == b"weights"
    assert not (tmp_path / "work").exists()  # nothing was copied
    with pytest.raises(BlobNotFound):
        store.local_copy("0" * 64, tmp_path / "work")


def test_check_writes_and_removes_a_temp_file(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    store.check()
    assert list(store.tmp.iterdir()) == []
    store.tmp.rmdir()
    (tmp_path / "tmp").write_text("not a folder")  # the folder cannot be recreated
    with pytest.raises(OSError):
        store.check()


def test_file_urls(tmp_path: Path) -> None:
    folder = tmp_path / "with space"
    store = from_url(folder.as_uri())
    assert store.root == folder and store.tmp.is_dir()
    assert from_url(f"file://localhost{folder}").root == folder
    for bad in ("file://otherhost/srv", "file:relative/path"):
        with pytest.raises(StorageConfigError, match="absolute folder"):
            from_url(bad)


def test_a_commit_without_room_for_the_blob_folder_is_storage_full(tmp_path: Path) -> None:
    """Inodes for the root, tmp/ and the staged file only: the commit's mkdir fails ENOSPC; nothing is kept."""
    from storage import StorageFull
    from tests.factories_disk import small_filesystem

    with small_filesystem(tmp_path / "blobs", 1024 * 1024, inodes=3) as root:
        store = LocalBlobStore(root)
        with pytest.raises(StorageFull):
            store.put([b"some bytes"])
        assert [p for p in root.rglob("*") if p.is_file()] == []
