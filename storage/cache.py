"""A bounded local cache of blobs read from a remote store (a worker's inputs), evicted least recently used.

Entries live under ``root/ab/cd/<sha256>`` and are read only. A fill streams into a temp file under
``root/tmp`` while hashing, checks the bytes against the key and only then renames the file into place,
so an interrupted or corrupt download never becomes an entry. Each hit refreshes the entry's mtime;
after a fill, the oldest entries are removed until the total is within ``max_bytes`` (never the entry
just filled). A caller gets a hard link of the entry in its own folder, so evicting an entry another
job still reads never takes the file away from it (the bytes go when the last link does).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from storage.base import StorageUnavailable, check_key

STALE_FILL_S = 3600.0  # a fill temp file this old was left by a process that died mid-download


class CorruptDownload(StorageUnavailable):
    """The bytes received do not hash to the key asked for (nothing was kept)."""


class BlobCache:
    """Blobs on local disk, at most ``max_bytes`` of them (an entry larger than that is not kept)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.max_bytes = max_bytes

    def path(self, key: str) -> Path:
        check_key(key)
        return self.root / key[:2] / key[2:4] / key

    def get(self, key: str) -> Path | None:
        """The entry for ``key`` (its use time refreshed), or None."""
        path = self.path(key)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def fill(self, key: str, chunks: Iterable[bytes], dest_dir: Path) -> Path:
        """Store ``chunks`` as the entry for ``key`` once they hash to it; returns the entry.

        A blob larger than the whole cache is not kept: it is moved into ``dest_dir`` instead."""
        dest = self.path(key)
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="fill-")
        try:
            h = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    h.update(chunk)
                    fh.write(chunk)
                    size += len(chunk)
            if h.hexdigest() != key:
                raise CorruptDownload(f"blob {key}: the {size} bytes received hash to {h.hexdigest()}; nothing kept")
            os.chmod(name, 0o444)
            if size > self.max_bytes:
                dest_dir.mkdir(parents=True, exist_ok=True)
                out = dest_dir / key
                os.replace(name, out)
                return out
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(name, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        self.evict(keep=key)
        return dest

    def entries(self) -> list[tuple[float, int, Path]]:
        """``(mtime, size, path)`` of every entry, oldest first."""
        found = []
        for path in self.root.glob("??/??/*"):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                found.append((st.st_mtime, st.st_size, path))
        return sorted(found)

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove the least recently used entries until the cache fits; returns the evicted keys."""
        evicted: list[str] = []
        with self._lock():
            self._drop_stale_fills()
            entries = self.entries()
            total = sum(size for _, size, _ in entries)
            for _, size, path in entries:
                if total <= self.max_bytes:
                    break
                if path.name == keep:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    evicted.append(path.name)
                total -= size
        return evicted

    def _drop_stale_fills(self) -> None:
        now = time.time()
        for tmp in self.tmp.glob("fill-*") if self.tmp.exists() else ():
            with contextlib.suppress(FileNotFoundError):
                if now - tmp.stat().st_mtime > STALE_FILL_S:
                    tmp.unlink()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One evicting process at a time (workers of one host share the cache folder)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def link_into(entry: Path, dest_dir: Path) -> Path:
    """A hard link (a copy across filesystems) of ``entry`` in ``dest_dir``: the caller's own name for it."""
    if entry.parent == dest_dir:
        return entry
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / entry.name
    if out.exists():
        return out
    tmp = dest_dir / f".{entry.name}.{os.getpid()}.link"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(entry, tmp)
    except OSError:
        shutil.copyfile(entry, tmp)
    os.replace(tmp, out)
    return out
