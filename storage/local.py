"""Local content-addressed blob store: stream to a temp file while hashing, then atomic rename."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from storage.base import StoredBlob, UploadTooLarge

T = TypeVar("T")
CHUNK = 1024 * 1024
ASYNC_BATCH = 4 * CHUNK
ASYNC_IN_FLIGHT = 2
SYNC_EVERY = 64 * CHUNK


class LocalBlobStore:
    """Blobs under ``root/ab/cd/<sha256>``; temp files under ``root/tmp`` (same filesystem)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise KeyError(f"not a blob key: {key!r}")
        return self.root / key[:2] / key[2:4] / key

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def open(self, key: str) -> BinaryIO:
        return self.path(key).open("rb")

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    @contextlib.contextmanager
    def _staging(self) -> Iterator[tuple[BinaryIO, str]]:
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="up-")
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh, tmp_name
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)

    def _commit(self, tmp_name: str, digest: str, size: int) -> StoredBlob:
        dest = self.path(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            os.unlink(tmp_name)
        else:
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, dest)
        return StoredBlob(key=digest, sha256=digest, size_bytes=size)

    def put(self, chunks: Iterable[bytes], limit: int | None = None) -> StoredBlob:
        """Store a stream of bytes; raise UploadTooLarge (leaving nothing) past ``limit``."""
        h = hashlib.sha256()
        size = 0
        with self._staging() as (fh, tmp_name):
            for chunk in chunks:
                size += len(chunk)
                if limit is not None and size > limit:
                    raise UploadTooLarge(limit)
                h.update(chunk)
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            return self._commit(tmp_name, h.hexdigest(), size)

    async def put_async(self, chunks: AsyncIterator[bytes], limit: int | None = None) -> StoredBlob:
        """Like ``put`` for an async body stream (see ``put_async_then``)."""
        return await self.put_async_then(chunks, limit, lambda blob: blob)

    async def put_async_then(
        self, chunks: AsyncIterator[bytes], limit: int | None, then: Callable[[StoredBlob], T]
    ) -> T:
        """Store an async body stream, then run ``then(blob)`` in a thread while holding the blob's key lock.

        The commit (rename into place) and ``then`` (inspect and index, or delete a rejected blob) are one
        critical section per key, across processes: a rejected upload can never delete bytes that a
        concurrent upload of the same content has just committed and is about to index. Hashing and writing run in two threads of their own
        (both release the GIL), overlapped with receiving; at most ``ASYNC_IN_FLIGHT`` batches are
        buffered, and the writer flushes to disk as it goes so the final fsync is short."""
        h = hashlib.sha256()
        size = 0
        buf: list[bytes] = []
        buffered = 0
        loop = asyncio.get_running_loop()
        pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        hasher = ThreadPoolExecutor(1, thread_name_prefix="upload-hash")
        writer = ThreadPoolExecutor(1, thread_name_prefix="upload-write")
        with self._staging() as (fh, tmp_name):
            fd = fh.fileno()
            written = 0

            def hash_parts(parts: list[bytes]) -> None:
                for part in parts:
                    h.update(part)

            def write_parts(parts: list[bytes]) -> None:
                nonlocal written
                for part in parts:
                    fh.write(part)
                before, written = written, written + sum(map(len, parts))
                if before // SYNC_EVERY != written // SYNC_EVERY:
                    fh.flush()
                    os.fdatasync(fd)

            def submit(parts: list[bytes]) -> None:
                pending.append(loop.run_in_executor(hasher, hash_parts, parts))
                pending.append(loop.run_in_executor(writer, write_parts, parts))

            try:
                async for chunk in chunks:
                    size += len(chunk)
                    if limit is not None and size > limit:
                        raise UploadTooLarge(limit)
                    buf.append(chunk)
                    buffered += len(chunk)
                    if buffered >= ASYNC_BATCH:
                        submit(buf)
                        buf, buffered = [], 0
                        while len(pending) > 2 * ASYNC_IN_FLIGHT:
                            await pending.popleft()
                submit(buf)
                while pending:
                    await pending.popleft()
            finally:
                hasher.shutdown(wait=True)  # never close the file under a running write
                writer.shutdown(wait=True)
            fh.flush()
            await loop.run_in_executor(None, os.fsync, fd)
            fh.close()
            digest = h.hexdigest()

            def commit_then() -> T:
                with self.key_lock(digest):
                    return then(self._commit(tmp_name, digest, size))

            return await loop.run_in_executor(None, commit_then)

    @contextlib.contextmanager
    def key_lock(self, key: str) -> Iterator[None]:
        """An exclusive, cross-process lock (flock) over a blob key; 256 lock files, striped by key prefix."""
        self.path(key)  # validates the key
        path = self.root / "locks" / f"{key[:2]}.lock"
        path.parent.mkdir(exist_ok=True)
        with open(path, "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def put_file(self, path: Path) -> StoredBlob:
        """Store a local file (worker artifacts)."""

        def read() -> Iterator[bytes]:
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk

        return self.put(read())


_STORES: dict[Path, LocalBlobStore] = {}


def get_store() -> LocalBlobStore:
    """The configured store (local filesystem under MODELPRESS_STORAGE_DIR)."""
    from models.settings import get_settings

    root = get_settings().blob_dir
    if root not in _STORES:
        _STORES[root] = LocalBlobStore(root)
    return _STORES[root]
