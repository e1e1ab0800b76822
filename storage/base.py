"""The blob store interface; an S3 backend implements the same five methods plus ``put``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

T = TypeVar("T")


class UploadTooLarge(Exception):
    """Raised while streaming when the byte count passes the limit; nothing was stored."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"upload exceeds the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class StoredBlob:
    key: str
    sha256: str
    size_bytes: int


class BlobStore(Protocol):
    def put(self, chunks: Iterable[bytes], limit: int | None = None) -> StoredBlob: ...
    async def put_async(self, chunks: AsyncIterator[bytes], limit: int | None = None) -> StoredBlob: ...
    async def put_async_then(
        self, chunks: AsyncIterator[bytes], limit: int | None, then: Callable[[StoredBlob], T]
    ) -> T: ...
    def key_lock(self, key: str) -> AbstractContextManager[None]: ...
    def put_file(self, path: Path) -> StoredBlob: ...
    def open(self, key: str) -> BinaryIO: ...
    def path(self, key: str) -> Path: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
