"""models.blobs: a sweep never removes a blob that is referenced or being written; a writer waits for a sweep."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from sqlalchemy import select, update

from models import blobs
from models.db import session_scope
from models.tables import BlobClaim, BlobOrphan, utcnow
from storage import get_store
from tests.api import builders


def test_sweep_keeps_a_blob_being_written_until_it_is_indexed(pg_env: str) -> None:
    store = get_store()
    blob = store.put([b"uploaded twice"])
    with session_scope() as s:
        blobs.mark_orphans(s, [blob.key])
    with blobs.writing(blob.key):  # an upload committed these bytes and is about to insert its row
        out = blobs.sweep_key(store, blob.key)
        assert (out.blobs, out.kept) == (0, 1) and store.exists(blob.key)
        job = builders.insert_job(builders.insert_model(), status="succeeded")
        builders.insert_artifact(job, b"uploaded twice")
    with session_scope() as s:  # the orphan stayed for the next sweep, which now finds the record
        assert s.get(BlobOrphan, blob.key) is not None
    assert blobs.sweep_orphans(store).kept == 1 and store.exists(blob.key)
    with session_scope() as s:
        assert s.scalars(select(BlobOrphan)).all() == [] and s.scalars(select(BlobClaim)).all() == []


def test_unreferenced_blob_is_swept_and_its_size_counted(pg_env: str) -> None:
    store = get_store()
    blob = store.put([b"a" * 777])
    out = blobs.sweep_key(store, blob.key)
    assert (out.blobs, out.bytes, out.kept) == (1, 777, 0) and not store.exists(blob.key)
    assert blobs.sweep_key(store, blob.key).bytes == 0  # already gone: nothing to count


def test_writer_waits_while_a_sweep_holds_the_key(pg_env: str) -> None:
    key = "ab" * 32
    claim_id = blobs._claim(key, blobs.DELETE)
    entered: list[float] = []

    def write() -> None:
        with blobs.writing(key, wait_s=10):
            entered.append(time.monotonic())

    t = threading.Thread(target=write)
    t.start()
    time.sleep(0.4)
    assert entered == []  # still waiting for the sweep
    released = time.monotonic()
    blobs._release(claim_id)
    t.join(5)
    assert entered and entered[0] >= released


def test_stale_claims_are_ignored_and_dropped(pg_env: str) -> None:
    key = "cd" * 32
    claim_id = blobs._claim(key, blobs.DELETE)
    with session_scope() as s:  # left by a process that died holding it
        s.execute(update(BlobClaim).where(BlobClaim.id == claim_id)
                  .values(created_at=utcnow() - timedelta(seconds=blobs.CLAIM_STALE_S + 5)))
    with blobs.writing(key, wait_s=0.5):
        pass
    assert blobs.drop_stale_claims() == 1
