"""Blob storage: a content-addressed interface (storage.base) with local-filesystem and S3 backends, chosen by URL."""

from storage.backends import get_store, open_store
from storage.base import (
    BlobNotFound,
    BlobStore,
    Staged,
    StorageConfigError,
    StorageFull,
    StorageUnavailable,
    StoredBlob,
    UploadTooLarge,
)
from storage.local import LocalBlobStore

__all__ = [
    "BlobNotFound",
    "BlobStore",
    "LocalBlobStore",
    "Staged",
    "StorageConfigError",
    "StorageFull",
    "StorageUnavailable",
    "StoredBlob",
    "UploadTooLarge",
    "get_store",
    "open_store",
]
