"""The workers' bounded blob cache: verified atomic fills, LRU eviction within the bound, links that outlive it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.cache import STALE_FILL_S, BlobCache, CorruptDownload, link_into


def _blob(fill: int, size: int = 1000) -> tuple[str, bytes]:
    data = bytes([fill]) * size
    return hashlib.sha256(data).hexdigest(), data


def test_a_fill_is_verified_and_atomic(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", 10_000)
    key, data = _blob(1)
    with pytest.raises(CorruptDownload, match="hash to"):
        cache.fill(key, [data[:-1], b"X"], tmp_path / "job")

    def breaks_off() -> Iterator[bytes]:
        yield data[:500]
        raise ConnectionResetError("peer went away")

    with pytest.raises(ConnectionResetError):
        cache.fill(key, breaks_off(), tmp_path / "job")
    assert cache.get(key) is None and list(cache.tmp.iterdir()) == [] and not (tmp_path / "job").exists()
    entry = cache.fill(key, [data[:300], data[300:]], tmp_path / "job")
    assert entry == cache.path(key) and entry.read_bytes() == data and entry.stat().st_mode & 0o777 == 0o444
    assert cache.get(key) == entry


def test_eviction_keeps_the_bound_and_the_most_recently_used(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", 2500)
    (ka, a), (kb, b), (kc, c) = _blob(0), _blob(1), _blob(2)
    cache.fill(ka, [a], tmp_path)
    cache.fill(kb, [b], tmp_path)
    os.utime(cache.path(ka), (1, 1))
    os.utime(cache.path(kb), (2, 2))
    assert cache.get(ka) is not None  # a hit makes a the most recent
    cache.fill(kc, [c], tmp_path)
    assert {p.name for _, _, p in cache.entries()} == {ka, kc} and cache.total_bytes() == 2000
    kbig, big = _blob(3, 3000)
    out = cache.fill(kbig, [big], tmp_path / "job")
    assert out == tmp_path / "job" / kbig and out.read_bytes() == big and cache.get(kbig) is None


def test_links_outlive_eviction_and_stale_fills_are_dropped(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", 1000)
    ka, a = _blob(0)
    linked = link_into(cache.fill(ka, [a], tmp_path), tmp_path / "job")
    assert link_into(cache.path(ka), tmp_path / "job") == linked  # already there
    assert linked.read_bytes() == a and linked.stat().st_ino == cache.path(ka).stat().st_ino
    stale, fresh = cache.tmp / "fill-dead", cache.tmp / "fill-live"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(stale, (1, 1))
    kb, b = _blob(1)
    cache.fill(kb, [b], tmp_path)  # evicts a, and the fill a dead process left
    assert cache.get(ka) is None and linked.read_bytes() == a
    assert sorted(p.name for p in cache.tmp.iterdir()) == ["fill-live"] and STALE_FILL_S >= 60
