"""Stream bytes into a local temp file while hashing: the first half of every backend's ``put``.

The staged file is what the API inspects before the blob is committed; a backend then moves it into
place (local: atomic rename) or uploads it (S3). Over the byte limit, or on any error, the temp file is
removed and nothing is stored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import hashlib
import os
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

CHUNK = 1024 * 1024
ASYNC_BATCH = 4 * CHUNK
ASYNC_IN_FLIGHT = 2
SYNC_EVERY = 64 * CHUNK


class UploadTooLarge(Exception):
    """Raised while streaming when the byte count passes the limit; nothing was stored."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"upload exceeds the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class Staged:
    """A fully received, fsynced temp file and its content address (not yet in the store)."""

    path: Path
    sha256: str
    size_bytes: int

    @property
    def key(self) -> str:
        """The blob key it will be committed under (blobs are content-addressed)."""
        return self.sha256


PREFIX = "up-"


def host_prefix() -> str:
    """The staged-file prefix of this host (``up-<host>.``): its files can be judged by their lock alone."""
    import re
    import socket

    return f"{PREFIX}{re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname())[:48] or 'host'}."


@contextlib.contextmanager
def _temp_file(folder: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """A new ``up-*`` file, exclusively flock-ed until the block ends (``sweep_leftovers`` skips locked ones)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=host_prefix())
    # A second descriptor holds the lock for the whole life of the staged file (the writer's is closed
    # before inspection); the kernel drops it when this process dies, however it dies.
    lock_fd = os.open(name, os.O_RDONLY)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh, Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        os.close(lock_fd)


@dataclass
class Leftovers:
    """What a sweep of a staging folder removed."""

    files: int = 0
    bytes: int = 0


def sweep_leftovers(folder: Path, grace_s: float = 60.0, own_grace_s: float | None = None) -> Leftovers:
    """Remove staged files no live process holds (a killed upload's ``up-*``), untouched for ``grace_s``
    (``own_grace_s`` for the files this host staged, named ``host_prefix()…``).

    A staging upload holds an exclusive ``flock`` on its file until it is committed or discarded, so a
    file that can be locked has no writer left. The grace period covers filesystems where locks do not
    reach other hosts; on this host the lock is enough, so the API's start-up sweep passes ``own_grace_s=0``
    and a quick restart removes what the killed process left."""
    out = Leftovers()
    if not folder.is_dir():
        return out
    now = time.time()
    mine = host_prefix()
    for path in folder.glob(f"{PREFIX}*"):
        wait = own_grace_s if own_grace_s is not None and path.name.startswith(mine) else grace_s
        try:
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < wait:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone meanwhile, or not ours to open
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live upload
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                out.files += 1
                out.bytes += st.st_size
        finally:
            os.close(fd)
    return out


@contextlib.contextmanager
def stage(chunks: Iterable[bytes], folder: Path, limit: int | None = None) -> Iterator[Staged]:
    """Write ``chunks`` to a temp file in ``folder``; the file lives until the block ends (or is moved away)."""
    h = hashlib.sha256()
    size = 0
    with _temp_file(folder) as (fh, path):
        for chunk in chunks:
            size += len(chunk)
            if limit is not None and size > limit:
                raise UploadTooLarge(limit)
            h.update(chunk)
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        yield Staged(path, h.hexdigest(), size)


@contextlib.asynccontextmanager
async def stage_async(chunks: AsyncIterator[bytes], folder: Path, limit: int | None = None) -> AsyncIterator[Staged]:
    """Like ``stage`` for an async body stream, with hashing and writing overlapped with receiving.

    Hashing and writing run in two threads of their own (both release the GIL); at most
    ``ASYNC_IN_FLIGHT`` batches are buffered, and the writer flushes to disk as it goes so the final
    fsync is short."""
    h = hashlib.sha256()
    size = 0
    buf: list[bytes] = []
    buffered = 0
    loop = asyncio.get_running_loop()
    pending: collections.deque[asyncio.Future[Any]] = collections.deque()
    hasher = ThreadPoolExecutor(1, thread_name_prefix="upload-hash")
    writer = ThreadPoolExecutor(1, thread_name_prefix="upload-write")
    with _temp_file(folder) as (fh, path):
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
        yield Staged(path, h.hexdigest(), size)


def file_chunks(path: Path, size: int = CHUNK) -> Iterator[bytes]:
    """The bytes of a local file, ``size`` at a time."""
    with open(path, "rb") as fh:
        while chunk := fh.read(size):
            yield chunk
