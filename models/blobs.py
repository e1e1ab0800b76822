"""Shared blobs and their records: a blob is removed only when no record of any owner refers to it.

Blobs are content-addressed and shared by every owner's models, datasets and artifacts. Deleting a
record writes its key to ``blob_orphans`` in the same transaction (so a crash leaks nothing); a sweep
then removes the blob when no record refers to it.

A sweep must never remove a blob that an upload of the same bytes has just committed but not yet
indexed. Both sides write a claim on the key (``blob_claims``) and then read the other side's claims:
whichever commits its claim second sees the first one. A sweep that sees a write claim keeps the blob;
an upload that sees a delete claim waits until the sweep is done and then commits its bytes afresh.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete, exists, select, union_all
from sqlalchemy.orm import Session

from models.db import retry_transient, session_scope
from models.tables import Artifact, BlobClaim, BlobOrphan, Dataset, Model, StageCacheEntry, utcnow

if TYPE_CHECKING:
    from storage.base import BlobStore

log = logging.getLogger("modelpress.blobs")

WRITE, DELETE = "write", "delete"
# A claim older than this was left by a process that died holding it: ignored, and removed by gc.
CLAIM_STALE_S = 600.0
WAIT_POLL_S = 0.05


@dataclass
class Swept:
    """What a sweep freed: blobs removed and their bytes; ``kept`` were still referenced or claimed."""

    blobs: int = 0
    bytes: int = 0
    kept: int = 0

    def add(self, other: Swept) -> None:
        self.blobs += other.blobs
        self.bytes += other.bytes
        self.kept += other.kept


# A claim waits out a database restart like the writes around it (a lost acknowledgement leaves at most a
# stale extra claim, which gc drops).
@retry_transient(10.0)
def _claim(key: str, purpose: str) -> int:
    with session_scope() as s:
        row = BlobClaim(key=key, purpose=purpose)
        s.add(row)
        s.flush()
        return int(row.id)


@retry_transient(10.0)
def _release(claim_id: int) -> None:
    with session_scope() as s:
        s.execute(delete(BlobClaim).where(BlobClaim.id == claim_id))


def _claimed(s: Session, key: str, purpose: str) -> bool:
    fresh = utcnow() - timedelta(seconds=CLAIM_STALE_S)
    return bool(s.scalar(select(exists().where(
        BlobClaim.key == key, BlobClaim.purpose == purpose, BlobClaim.created_at > fresh))))


def referenced(s: Session, key: str) -> bool:
    """Whether any record of any owner (model, dataset, artifact, stage-cache entry) refers to blob ``key``."""
    refs = union_all(
        select(Model.id).where(Model.storage_key == key),
        select(Dataset.id).where(Dataset.storage_key == key),
        select(Artifact.id).where(Artifact.storage_key == key),
        select(StageCacheEntry.job_id).where(StageCacheEntry.blob_key == key),
    ).subquery()
    return s.scalar(select(exists(select(refs.c.id)))) is True


@contextlib.contextmanager
def writing(key: str, wait_s: float = 60.0) -> Iterator[None]:
    """Hold a write claim on ``key`` while the caller commits the blob and inserts the record that refers to it."""
    claim_id = _claim(key, WRITE)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            with session_scope() as s:
                if not _claimed(s, key, DELETE):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"blob {key} stayed claimed by a sweep for {wait_s} s")
            time.sleep(WAIT_POLL_S)
        yield
    finally:
        _release(claim_id)


def mark_orphans(s: Session, keys: Iterable[str]) -> None:
    """In the caller's transaction (the one that deletes the records): note keys that may have lost their last record."""
    for key in set(keys):
        if s.get(BlobOrphan, key) is None:
            s.add(BlobOrphan(key=key))


def sweep_key(store: BlobStore, key: str) -> Swept:
    """Remove blob ``key`` if no record refers to it and no upload is writing it; forget the orphan either way."""
    claim_id = _claim(key, DELETE)
    try:
        with session_scope() as s:
            keep = referenced(s, key) or _claimed(s, key, WRITE)
        if keep:
            out = Swept(kept=1)
        else:
            size = 0
            with contextlib.suppress(FileNotFoundError):
                size = store.size(key)
            store.delete(key)
            out = Swept(blobs=1 if size else 0, bytes=size)
        if not keep or not _write_pending(key):
            with session_scope() as s:
                s.execute(delete(BlobOrphan).where(BlobOrphan.key == key))
        return out
    finally:
        _release(claim_id)


def _write_pending(key: str) -> bool:
    with session_scope() as s:
        return _claimed(s, key, WRITE)


def sweep_orphans(store: BlobStore, limit: int = 10_000) -> Swept:
    """Sweep every key in ``blob_orphans`` (what deletions left, including those a crash interrupted)."""
    with session_scope() as s:
        keys = list(s.scalars(select(BlobOrphan.key).order_by(BlobOrphan.since).limit(limit)))
    total = Swept()
    for key in keys:
        try:
            total.add(sweep_key(store, key))
        except Exception:  # one unreachable blob must not stop the rest; it stays an orphan for next time
            log.warning("sweep of blob %s failed", key, exc_info=True)
    return total


def drop_stale_claims() -> int:
    """Remove claims left by processes that died holding them; returns how many."""
    stale = utcnow() - timedelta(seconds=CLAIM_STALE_S)
    with session_scope() as s:
        res = s.execute(delete(BlobClaim).where(BlobClaim.created_at < stale))
        return int(getattr(res, "rowcount", 0) or 0)
