"""Collection of stage-cache entries (gc): unused past an age, then least recently used beyond a total size."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete, select

from models import blobs
from models.db import session_scope
from models.tables import StageCacheEntry, utcnow
from worker.stage_cache.keys import STAGE

if TYPE_CHECKING:
    from datetime import datetime


def collect(max_age: timedelta | None, max_bytes: int, now: datetime | None = None) -> tuple[int, list[str]]:
    """Delete entries unused for ``max_age`` and then the least recently used beyond ``max_bytes`` in all
    (0: no bound); returns ``(entries deleted, their blob keys)`` — orphans now, for the sweep."""
    now = now or utcnow()
    with session_scope() as s:
        ids: set[int] = set()
        if max_age is not None:
            ids |= set(s.scalars(select(StageCacheEntry.id).where(StageCacheEntry.last_used_at < now - max_age)))
        if max_bytes > 0:
            rows = s.execute(select(StageCacheEntry.id, StageCacheEntry.size_bytes)
                             .where(StageCacheEntry.kind == STAGE)
                             .order_by(StageCacheEntry.last_used_at.desc(), StageCacheEntry.id.desc())).all()
            total = 0
            for rid, size in rows:
                if rid in ids:
                    continue
                total += int(size)
                if total > max_bytes:
                    ids.add(int(rid))
        if not ids:
            return 0, []
        keys = sorted({k for k in s.scalars(select(StageCacheEntry.blob_key).where(
            StageCacheEntry.id.in_(ids), StageCacheEntry.blob_key.is_not(None))) if k})
        blobs.mark_orphans(s, keys)
        s.execute(delete(StageCacheEntry).where(StageCacheEntry.id.in_(ids)))
        return len(ids), keys
