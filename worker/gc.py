"""Garbage collection: retention, deferred deletes, orphan blobs, and the leftovers of killed processes.

``run_gc`` is what ``modelpress gc`` runs and what the worker runs every ``MODELPRESS_GC_INTERVAL_S``;
it imports nothing heavy. In order:

1. jobs whose DELETE waited for their cancel, now terminal, are deleted;
2. failed and cancelled jobs finished more than ``retain_failed_jobs_days`` ago are deleted, and the
   artifacts of succeeded jobs finished more than ``retain_artifacts_days`` ago (the job row stays);
3. stage-cache entries (``worker.stage_cache``) unused for ``retain_cache_days`` are deleted, then the
   least recently used beyond ``stage_cache_max_bytes`` in all; their blobs become orphans;
4. orphan blobs (keys whose records were deleted, including deletes a crash interrupted) are swept
   when no record of any owner refers to them (``models.blobs``);
5. staged uploads no live process holds (``storage/tmp/up-*`` of a killed upload), work folders of
   attempts that no longer run, and cache entries (local copies of remote blobs) older than
   ``retain_cache_days`` are removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from models import blobs
from models.db import session_scope
from models.purge import Purged, purge_artifacts, purge_jobs
from models.settings import Settings, get_settings
from models.tables import CANCELLED, FAILED, QUEUED, SUCCEEDED, TERMINAL, Artifact, Job, utcnow
from storage import get_store
from storage.staging import sweep_leftovers

log = logging.getLogger("modelpress.gc")

BATCH = 500
DAY_S = 86400.0
_ATTEMPT = re.compile(r"^attempt-(\d+)$")


@dataclass
class GcReport:
    """What one gc run freed."""

    jobs: int = 0
    artifacts: int = 0
    records: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    staged_files: int = 0
    staged_bytes: int = 0
    work_folders: int = 0
    work_bytes: int = 0
    cache_files: int = 0
    cache_bytes: int = 0
    stale_claims: int = 0
    stage_entries: int = 0

    @property
    def freed_bytes(self) -> int:
        return self.blob_bytes + self.staged_bytes + self.work_bytes + self.cache_bytes

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"freed_bytes": self.freed_bytes}

    def summary(self) -> str:
        """One line saying what was freed."""
        return (f"freed {self.freed_bytes} bytes: {self.records} records ({self.jobs} jobs, {self.artifacts} artifacts), "
                f"{self.blobs} blobs ({self.blob_bytes} B), {self.staged_files} staged uploads ({self.staged_bytes} B), "
                f"{self.work_folders} work folders ({self.work_bytes} B), {self.cache_files} cache files "
                f"({self.cache_bytes} B), {self.stage_entries} stage-cache entries")


def _purge_in_batches(ids: list[str], purge: str) -> Purged:
    total = Purged()
    for i in range(0, len(ids), BATCH):
        with session_scope() as s:
            chunk = ids[i:i + BATCH]
            total.add(purge_jobs(s, chunk) if purge == "jobs" else purge_artifacts(s, chunk))
    return total


def expired(settings: Settings, now: datetime) -> Purged:
    """Delete what retention and deferred DELETEs say should go (rows only; blobs become orphans)."""
    with session_scope() as s:
        ids = set(s.scalars(select(Job.id).where(Job.delete_requested.is_(True), Job.status.in_(TERMINAL))))
        if settings.retain_failed_jobs_days > 0:
            before = now - timedelta(days=settings.retain_failed_jobs_days)
            ids |= set(s.scalars(select(Job.id).where(Job.status.in_((FAILED, CANCELLED)), Job.finished_at < before)))
        art_ids: list[str] = []
        if settings.retain_artifacts_days > 0:
            before = now - timedelta(days=settings.retain_artifacts_days)
            art_ids = list(s.scalars(
                select(Artifact.id).join(Job, Job.id == Artifact.job_id)
                .where(Job.status == SUCCEEDED, Job.finished_at < before)
            ))
    out = _purge_in_batches(sorted(ids), "jobs")
    out.add(_purge_in_batches(art_ids, "artifacts"))
    return out


def _tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _remove_tree(path: Path) -> int:
    size = _tree_size(path)
    shutil.rmtree(path, ignore_errors=True)
    return size


def clean_work_folders(work: Path, grace_s: float) -> tuple[int, int]:
    """Remove ``work/<job>/attempt-N`` folders no worker runs any more; ``(folders, bytes)`` removed.

    An attempt's folder is live only while its job is active and on that attempt: a finished or deleted
    job's folders, a queued job's (nothing runs it) and superseded attempts' are leftovers of killed
    workers. Folders touched within ``grace_s`` are left alone (a claim may be creating one)."""
    if not work.is_dir():
        return 0, 0
    now = time.time()
    folders = removed = 0
    job_dirs = [d for d in work.iterdir() if d.is_dir() and not d.is_symlink()]
    with session_scope() as s:
        states = {jid: (status, attempt) for jid, status, attempt in s.execute(
            select(Job.id, Job.status, Job.attempt).where(Job.id.in_([d.name for d in job_dirs])))}
    for job_dir in job_dirs:
        status, attempt = states.get(job_dir.name, (None, 0))
        for sub in list(job_dir.iterdir()):
            m = _ATTEMPT.match(sub.name)
            try:
                fresh = now - sub.lstat().st_mtime < grace_s
            except OSError:
                continue
            live = status is not None and status not in TERMINAL and status != QUEUED and m is not None \
                and int(m.group(1)) >= attempt
            if fresh or live:
                continue
            removed += _remove_tree(sub) if sub.is_dir() and not sub.is_symlink() else _unlink(sub)
            folders += 1
        with contextlib.suppress(OSError):
            job_dir.rmdir()  # only once empty
    return folders, removed


def _unlink(path: Path) -> int:
    try:
        size = path.lstat().st_size
        path.unlink()
        return size
    except OSError:
        return 0


def clean_cache(folder: Path, max_age_s: float) -> tuple[int, int]:
    """Remove cached local copies of remote blobs not used (read or written) for ``max_age_s``."""
    if max_age_s <= 0 or not folder.is_dir():
        return 0, 0
    now = time.time()
    files = freed = 0
    for path in folder.rglob("*"):
        try:
            st = path.lstat()
        except OSError:
            continue
        if path.name.startswith(".") or path.parent.name == "tmp":
            continue  # the cache's lock file; fills in progress (the cache drops stale ones itself)
        if path.is_file() and now - max(st.st_mtime, st.st_atime) >= max_age_s:
            freed += _unlink(path)
            files += 1
    return files, freed


def clean_leftovers(settings: Settings | None = None) -> GcReport:
    """The start-up part of gc: staged uploads of killed processes and work folders of killed attempts."""
    settings = settings or get_settings()
    report = GcReport()
    staged = sweep_leftovers(get_store().staging_dir, settings.leftover_grace_s)
    report.staged_files, report.staged_bytes = staged.files, staged.bytes
    report.work_folders, report.work_bytes = clean_work_folders(settings.home / "work", settings.leftover_grace_s)
    return report


def finish_deferred_deletes() -> GcReport:
    """Delete jobs whose DELETE waited for their cancel and that have stopped, with their blobs (the
    reconciler's timer runs this every round, so they do not wait for the next full gc)."""
    with session_scope() as s:
        ids = sorted(s.scalars(select(Job.id).where(Job.delete_requested.is_(True), Job.status.in_(TERMINAL))))
    report = GcReport()
    if not ids:
        return report
    purged = _purge_in_batches(ids, "jobs")
    report.jobs, report.artifacts, report.records = purged.jobs, purged.artifacts, purged.records
    store = get_store()
    for key in sorted(purged.keys):
        swept = blobs.sweep_key(store, key)
        report.blobs += swept.blobs
        report.blob_bytes += swept.bytes
    return report


def run_gc(settings: Settings | None = None, now: datetime | None = None) -> GcReport:
    """One full gc pass (module doc); returns what it freed."""
    settings = settings or get_settings()
    now = now or utcnow()
    report = clean_leftovers(settings)
    purged = expired(settings, now)
    report.jobs, report.artifacts, report.records = purged.jobs, purged.artifacts, purged.records
    from worker.stage_cache.collect import collect

    max_age = timedelta(days=settings.retain_cache_days) if settings.retain_cache_days > 0 else None
    report.stage_entries, _ = collect(max_age, settings.stage_cache_max_bytes, now)
    swept = blobs.sweep_orphans(get_store())  # the keys purged above are orphans now, with any older ones
    report.blobs, report.blob_bytes = swept.blobs, swept.bytes
    report.stale_claims = blobs.drop_stale_claims()
    # local copies handed to jobs ($HOME/blobs) and the S3 store's bounded read cache, by age
    for folder in (settings.home / "blobs", settings.blob_cache_dir or settings.home / "blob-cache"):
        files, freed = clean_cache(folder, settings.retain_cache_days * DAY_S)
        report.cache_files += files
        report.cache_bytes += freed
    log.info("gc: %s", report.summary())
    return report
