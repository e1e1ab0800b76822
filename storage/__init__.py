"""Blob storage: a content-addressed interface with a local-filesystem backend."""

from storage.base import BlobStore, StoredBlob
from storage.local import LocalBlobStore, get_store

__all__ = ["BlobStore", "LocalBlobStore", "StoredBlob", "get_store"]
