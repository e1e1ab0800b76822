"""Local content-addressed blob store: uploads are staged under ``root/tmp``, then renamed into place."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from storage.base import BlobNotFound, BlobStore, Staged, StorageConfigError, StoredBlob, check_key, full_disk


class LocalBlobStore(BlobStore):
    """Blobs under ``root/ab/cd/<sha256>``; temp files under ``root/tmp`` (same filesystem, atomic rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        super().__init__(staging_dir=self.tmp)

    def path(self, key: str) -> Path:
        """Where this backend keeps ``key`` (local backend only: nothing outside storage/ relies on it)."""
        check_key(key)
        return self.root / key[:2] / key[2:4] / key

    def commit(self, staged: Staged) -> StoredBlob:
        """Rename the staged file into place, or drop it when the same bytes are already stored."""
        dest = self.path(staged.sha256)
        with full_disk():  # a full disk refuses the folder (or its inode), not the rename
            dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged.path)
        else:
            os.chmod(staged.path, 0o644)
            os.replace(staged.path, dest)
        return StoredBlob(key=staged.sha256, sha256=staged.sha256, size_bytes=staged.size_bytes)

    def open(self, key: str) -> BinaryIO:
        try:
            return self.path(key).open("rb")
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    def local_copy(self, key: str, dest_dir: Path) -> Path:
        """The store's own file (no copy): the caller only reads it."""
        path = self.path(key)
        if not path.is_file():
            raise BlobNotFound(key)
        return path

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def check(self) -> None:
        """Create, write and remove a file in the temp folder."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="ready-")
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(name)


def from_url(url: str) -> LocalBlobStore:
    """The local store of a ``file:///absolute/folder`` URL."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise StorageConfigError(f"MODELPRESS_STORAGE_URL {url!r}: a file URL names an absolute folder (file:///srv/blobs)")
    return LocalBlobStore(Path(unquote(parts.path)))
