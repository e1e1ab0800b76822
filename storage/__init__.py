"""Blob storage: a content-addressed interface (storage.base) with a local-filesystem backend, chosen by URL."""

from storage.backends import get_store, open_store
from storage.base import BlobNotFound, BlobStore, Staged, StorageConfigError, StoredBlob, UploadTooLarge
from storage.local import LocalBlobStore

__all__ = [
    "BlobNotFound",
    "BlobStore",
    "LocalBlobStore",
    "Staged",
    "StorageConfigError",
    "StoredBlob",
    "UploadTooLarge",
    "get_store",
    "open_store",
]
