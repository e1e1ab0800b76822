"""The blob store interface: every backend keeps the same contract; the backend is chosen by URL."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from storage import BlobNotFound, BlobStore, LocalBlobStore, StorageConfigError, UploadTooLarge, open_store
from tests.storage.memory import MemoryBlobStore

DATA = bytes(range(256)) * 4000  # 1 024 000 bytes: several read chunks


@pytest.fixture(params=["local", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    if request.param == "s3":  # the real SeaweedFS server, a bucket of this test's own
        from tests.storage.test_s3 import new_store

        return new_store(request.getfixturevalue("s3_server"), tmp_path)
    return MemoryBlobStore(tmp_path / "staging")


def _staged_files(store: BlobStore) -> list[Path]:
    return [p for p in store.staging_dir.iterdir()] if store.staging_dir.exists() else []


def test_put_then_read_back_whole_and_in_ranges(store: BlobStore) -> None:
    blob = store.put([DATA[:1000], DATA[1000:]])
    assert blob.key == blob.sha256 == hashlib.sha256(DATA).hexdigest() and blob.size_bytes == len(DATA)
    assert store.exists(blob.key) and store.size(blob.key) == len(DATA)
    with store.open(blob.key) as fh:
        assert fh.read() == DATA
    assert b"".join(store.iter_chunks(blob.key)) == DATA
    assert b"".join(store.iter_chunks(blob.key, 1000, 300_000, chunk_size=4096)) == DATA[1000:301_000]
    assert b"".join(store.iter_chunks(blob.key, len(DATA) - 5, 100)) == DATA[-5:]
    assert max(len(c) for c in store.iter_chunks(blob.key, chunk_size=4096)) == 4096
    assert store.put([DATA]) == blob  # same bytes, same blob
    assert _staged_files(store) == []


def test_put_async_and_put_file(store: BlobStore, tmp_path: Path) -> None:
    async def body() -> AsyncIterator[bytes]:
        for i in range(0, len(DATA), 70_000):
            yield DATA[i : i + 70_000]

    blob = anyio.run(store.put_async, body())
    assert blob.sha256 == hashlib.sha256(DATA).hexdigest()
    src = tmp_path / "artifact.bin"
    src.write_bytes(b"artifact")
    art = store.put_file(src)
    assert b"".join(store.iter_chunks(art.key)) == b"artifact" and src.exists()


def test_over_the_limit_nothing_is_stored(store: BlobStore) -> None:
    with pytest.raises(UploadTooLarge) as info:
        store.put([b"x" * 600, b"x" * 600], limit=1000)
    assert info.value.limit == 1000
    assert not store.exists(hashlib.sha256(b"x" * 1200).hexdigest()) and _staged_files(store) == []


def test_an_uncommitted_stage_stores_nothing(store: BlobStore) -> None:
    with pytest.raises(RuntimeError), store.stage([b"inspected and refused"]) as staged:
        assert staged.path.read_bytes() == b"inspected and refused"
        raise RuntimeError("refused")
    assert not store.exists(staged.key) and _staged_files(store) == []


def test_missing_blobs_and_delete(store: BlobStore, tmp_path: Path) -> None:
    missing = "0" * 64
    assert not store.exists(missing)
    for call in (lambda: store.size(missing), lambda: store.open(missing),
                 lambda: store.local_copy(missing, tmp_path / "c")):
        with pytest.raises(BlobNotFound):
            call()
    blob = store.put([b"short-lived"])
    store.delete(blob.key)
    store.delete(blob.key)  # absent: nothing happens
    assert not store.exists(blob.key)
    with pytest.raises(KeyError):
        store.exists("../../etc/passwd")


def test_local_copy_has_the_bytes(store: BlobStore, tmp_path: Path) -> None:
    blob = store.put([DATA])
    assert store.local_copy(blob.key, tmp_path / "work").read_bytes() == DATA
    store.check()


# -- selection ------------------------------------------------------------------------------------


def test_the_default_url_is_the_storage_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.settings import get_settings
    from storage import backends, get_store

    monkeypatch.setattr(backends, "_STORES", {})
    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MODELPRESS_STORAGE_URL", raising=False)
    monkeypatch.setenv("MODELPRESS_STORAGE_DIR", str(tmp_path / "blob dir"))
    get_settings.cache_clear()
    try:
        store = get_store()
        assert isinstance(store, LocalBlobStore) and store.root == tmp_path / "blob dir"
        assert get_store() is store
        monkeypatch.setenv("MODELPRESS_STORAGE_URL", (tmp_path / "elsewhere").as_uri())
        get_settings.cache_clear()
        other = get_store()
        assert isinstance(other, LocalBlobStore) and other.root == tmp_path / "elsewhere"
    finally:
        get_settings.cache_clear()


def test_an_s3_url_selects_the_s3_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.settings import get_settings
    from storage.s3 import S3BlobStore

    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MODELPRESS_BLOB_CACHE_BYTES", "1000")
    get_settings.cache_clear()
    try:
        store = open_store("s3://my-bucket/some/prefix/")
        assert isinstance(store, S3BlobStore) and (store.bucket, store.prefix) == ("my-bucket", "some/prefix")
        assert store.cache.max_bytes == 1000 and store.cache.root == tmp_path / "home" / "blob-cache"
        with pytest.raises(StorageConfigError, match="names a bucket"):
            open_store("s3:///prefix")
        monkeypatch.setenv("MODELPRESS_S3_PART_BYTES", str(1024 * 1024))
        get_settings.cache_clear()
        with pytest.raises(StorageConfigError, match="S3_PART_BYTES must be at least 5242880"):
            open_store("s3://my-bucket")
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("url", ["gcs://bucket", "/srv/blobs", "ftp://host/x"])
def test_unknown_schemes_are_a_clear_error(url: str) -> None:
    with pytest.raises(StorageConfigError, match=r"unknown scheme .*supported: file://, s3://"):
        open_store(url)


def test_a_registered_backend_is_selected_by_its_scheme(memory_store: MemoryBlobStore) -> None:
    from storage import get_store

    assert get_store() is memory_store
    blob = get_store().put([b"in memory"])
    assert memory_store.blobs == {blob.key: b"in memory"}


def test_a_full_staging_disk_is_storage_full_and_leaves_nothing(tmp_path: Path) -> None:
    """Sync and async staging onto a real 256 KiB tmpfs: StorageFull (an OSError, errno ENOSPC), no temp file."""
    import errno

    from storage import StorageFull
    from storage.base import is_full
    from tests.factories_disk import small_filesystem

    with small_filesystem(tmp_path / "staging", 256 * 1024) as folder:
        store = MemoryBlobStore(folder)
        with pytest.raises(StorageFull) as caught:
            store.put([DATA])
        assert caught.value.errno == errno.ENOSPC and is_full(caught.value)
        assert "no space left in the blob store" in str(caught.value)

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(DATA), 65536):
                yield DATA[i:i + 65536]

        with pytest.raises(StorageFull):
            anyio.run(store.put_async, chunks())
        assert _staged_files(store) == []
        assert store.put([DATA[:1000]]).size_bytes == 1000  # the failures left the room they had


def test_other_os_errors_are_not_storage_full() -> None:
    import errno

    from storage.base import full_disk, is_full

    with pytest.raises(PermissionError) as caught, full_disk():
        raise PermissionError(errno.EACCES, "Permission denied")
    assert not is_full(caught.value) and not is_full(ValueError("x"))
