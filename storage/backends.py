"""Choosing the blob store: ``MODELPRESS_STORAGE_URL``'s scheme names the backend."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from storage.base import BlobStore, StorageConfigError

Factory = Callable[[str], BlobStore]


def _local(url: str) -> BlobStore:
    from storage.local import from_url

    return from_url(url)


def _s3(url: str) -> BlobStore:
    from storage.s3 import from_url

    return from_url(url)


# Scheme -> factory taking the whole URL. Tests register test doubles here.
BACKENDS: dict[str, Factory] = {"file": _local, "s3": _s3}
# Schemes docs/architecture.md §9 promises that no backend serves yet.
PLANNED: frozenset[str] = frozenset()
_STORES: dict[str, BlobStore] = {}


def open_store(url: str) -> BlobStore:
    """A new store for ``url``; StorageConfigError for a scheme no backend serves."""
    scheme = urlsplit(url).scheme.lower()
    factory = BACKENDS.get(scheme)
    if factory is None and scheme in PLANNED:
        raise StorageConfigError(
            f"MODELPRESS_STORAGE_URL {url!r}: the {scheme}:// backend is not implemented yet; use a file:// URL"
        )
    if factory is None:
        known = ", ".join(f"{s}://" for s in sorted(BACKENDS))
        raise StorageConfigError(
            f"MODELPRESS_STORAGE_URL {url!r}: unknown scheme {scheme + '://' if scheme else '(none)'}; "
            f"supported: {known}"
        )
    return factory(url)


def get_store() -> BlobStore:
    """The configured store (``MODELPRESS_STORAGE_URL``; default the local folder MODELPRESS_STORAGE_DIR)."""
    from models.settings import get_settings

    url = get_settings().storage_url
    store = _STORES.get(url)
    if store is None:
        store = _STORES[url] = open_store(url)
    return store
