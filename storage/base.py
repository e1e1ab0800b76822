"""The blob store interface: content-addressed blobs streamed in and out, never addressed by local path.

A backend implements the abstract methods (``commit`` a staged upload, ``open``, ``local_copy``,
``exists``, ``size``, ``delete``, ``check``); streaming in (``put``, ``put_async``, ``stage``,
``stage_async``, ``put_file``) and ranged streaming out (``iter_chunks``) are built on them here, and
a backend may override ``iter_chunks`` with a native ranged read (an S3 ``Range`` GET).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import tempfile
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from storage import staging
from storage.staging import Staged, UploadTooLarge

CHUNK = 256 * 1024
HEX = frozenset("0123456789abcdef")

__all__ = [
    "BlobNotFound",
    "BlobStore",
    "Staged",
    "StorageConfigError",
    "StorageFull",
    "StorageUnavailable",
    "StoredBlob",
    "UploadTooLarge",
    "check_key",
]


class BlobNotFound(FileNotFoundError):
    """The store holds no blob under this key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no blob {key}")
        self.key = key


class StorageUnavailable(OSError):
    """The store could not be reached (or kept failing) after its own retries; nothing partial was kept.

    The API answers 503 ``storage_unavailable``; a worker fails the step with the same code. The message
    names the operation and the store, never credentials."""


# The errors a full filesystem (or a spent disk quota) gives a write, a rename or a mkdir.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class StorageFull(OSError):
    """A write into the store (or its staging folder) found no space left; nothing partial was kept.

    The API answers 507 ``storage_full``; a worker fails the job with the same code and the step that
    was writing. The caller's records are not written, so a later try (after space is freed) can succeed."""


def is_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it wraps) says the disk (or the quota) is full: an ENOSPC/EDQUOT OSError,
    SQLite's "database or disk is full", PostgreSQL's disk_full (SQLSTATE 53100)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, StorageFull) or (isinstance(e, OSError) and e.errno in FULL_ERRNOS):
            return True
        if "database or disk is full" in str(e) or getattr(e, "sqlstate", None) == "53100":
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "orig", None)]
    return False


@contextlib.contextmanager
def full_disk(what: str = "the blob store") -> Iterator[None]:
    """Re-raise an ENOSPC/EDQUOT ``OSError`` from the block as ``StorageFull`` saying where it ran out."""
    try:
        yield
    except StorageFull:
        raise
    except OSError as exc:
        if exc.errno not in FULL_ERRNOS:
            raise
        raise StorageFull(exc.errno, f"no space left in {what}: {exc.strerror}") from exc


class StorageConfigError(ValueError):
    """MODELPRESS_STORAGE_URL names no usable backend; the message says which and why."""


@dataclass(frozen=True)
class StoredBlob:
    key: str
    sha256: str
    size_bytes: int


def check_key(key: str) -> str:
    """``key`` if it is a blob key (a lowercase sha256 hex digest), else KeyError: keys never come from users."""
    if len(key) != 64 or not HEX.issuperset(key):
        raise KeyError(f"not a blob key: {key!r}")
    return key


class BlobStore(ABC):
    """Content-addressed blobs: the key of a blob is the sha256 of its bytes."""

    def __init__(self, staging_dir: Path | None = None) -> None:
        # Uploads are received into temp files here (a backend that renames wants its own filesystem).
        self.staging_dir = Path(staging_dir) if staging_dir is not None else Path(tempfile.gettempdir())

    # -- what a backend implements ---------------------------------------------------------------

    @abstractmethod
    def commit(self, staged: Staged) -> StoredBlob:
        """Store a staged file under its sha256 (consuming the file); a no-op when the key exists."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A binary stream of the blob; BlobNotFound when absent."""

    @abstractmethod
    def local_copy(self, key: str, dest_dir: Path) -> Path:
        """A local file with the blob's bytes, to be read only (the local backend returns its own file)."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the store holds ``key``."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The blob's size in bytes; BlobNotFound when absent."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the blob (nothing happens when it is absent); callers check no record refers to it."""

    @abstractmethod
    def check(self) -> None:
        """Raise when the store cannot be written and read (``/readyz``)."""

    def download_url(self, key: str, *, disposition: str, media_type: str, expires_s: int) -> str | None:
        """A URL a client can GET the blob from directly for ``expires_s`` seconds, answered with these
        ``Content-Disposition`` and ``Content-Type``; None when the backend has none (the API streams it)."""
        return None

    # -- built on the above ----------------------------------------------------------------------

    def iter_chunks(self, key: str, start: int = 0, length: int | None = None, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The blob's bytes from ``start``, ``length`` of them (all when None), ``chunk_size`` at a time."""
        with self.open(key) as fh:
            if start:
                fh.seek(start)
            left = length
            while left is None or left > 0:
                chunk = fh.read(chunk_size if left is None else min(chunk_size, left))
                if not chunk:
                    break
                if left is not None:
                    left -= len(chunk)
                yield chunk

    @contextlib.contextmanager
    def stage(self, chunks: Iterable[bytes], limit: int | None = None) -> Iterator[Staged]:
        """Receive ``chunks`` into a local temp file (UploadTooLarge past ``limit``); ``commit`` it to keep it."""
        with full_disk(), staging.stage(chunks, self.staging_dir, limit) as staged:
            yield staged

    @contextlib.asynccontextmanager
    async def stage_async(self, chunks: AsyncIterator[bytes], limit: int | None = None) -> AsyncIterator[Staged]:
        """Like ``stage`` for an async body stream, hashing and writing overlapped with receiving."""
        with full_disk():
            async with staging.stage_async(chunks, self.staging_dir, limit) as staged:
                yield staged

    def put(self, chunks: Iterable[bytes], limit: int | None = None) -> StoredBlob:
        """Store a stream of bytes; raise UploadTooLarge (leaving nothing) past ``limit``."""
        with self.stage(chunks, limit) as staged:
            return self.commit(staged)

    async def put_async(self, chunks: AsyncIterator[bytes], limit: int | None = None) -> StoredBlob:
        """Store an async stream of bytes (the commit runs in a thread)."""
        async with self.stage_async(chunks, limit) as staged:
            return await asyncio.get_running_loop().run_in_executor(None, self.commit, staged)

    def put_file(self, path: Path) -> StoredBlob:
        """Store a local file (worker artifacts)."""
        return self.put(staging.file_chunks(path, staging.CHUNK))
