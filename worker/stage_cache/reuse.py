"""Whole-job reuse: a succeeded job noted under its whole-job key; an identical later job finishes at once with its artifacts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select

from models.db import session_scope
from models.spec import JobSpec
from models.tables import Artifact, Job, StageCacheEntry, utcnow
from worker import records
from worker.stage_cache.keys import JOB, db_shas, job_key

if TYPE_CHECKING:
    from worker.records import Claim


def remember_job(owner: str, job_id: str, key: str) -> None:
    """Note a succeeded job under its whole-job key (a later identical job reuses it)."""
    with session_scope() as s:
        s.execute(delete(StageCacheEntry).where(
            StageCacheEntry.owner == owner, StageCacheEntry.key == key, StageCacheEntry.kind == JOB))
        s.add(StageCacheEntry(owner=owner, key=key, kind=JOB, blob_key=None, size_bytes=0,
                              entry={}, job_id=job_id))


@dataclass
class FinishedJob:
    """A finished job identical to this one: its id, result and artifact rows (name, kind, sha, size, key, media)."""

    job_id: str
    result: dict[str, Any]
    artifacts: list[tuple[str, str, str, int, str, str]]


def finished_job(owner: str, key: str, this_job: str) -> FinishedJob | None:
    """The owner's succeeded job under ``key`` with all its artifacts still there; None otherwise."""
    with session_scope() as s:
        row = s.scalar(select(StageCacheEntry).where(
            StageCacheEntry.owner == owner, StageCacheEntry.key == key, StageCacheEntry.kind == JOB))
        if row is None or row.job_id == this_job:
            return None
        job = s.get(Job, row.job_id)
        arts = [] if job is None else list(s.scalars(select(Artifact).where(Artifact.job_id == job.id)))
        if job is None or job.status != "succeeded" or job.owner != owner or not job.result \
                or "model.onnx" not in {a.name for a in arts}:
            s.delete(row)  # the job or its artifacts were deleted since: forget it
            return None
        row.last_used_at = utcnow()
        return FinishedJob(job.id, dict(job.result),
                           [(a.name, a.kind, a.sha256, a.size_bytes, a.storage_key, a.media_type) for a in arts])


def reuse_finished(claim: Claim, owner: str, spec: JobSpec, workdir: Path) -> bool:
    """Finish this job at once from an identical succeeded job of the same owner, if there is one.

    Its artifacts become this job's (new rows on the same blobs, under write claims so no sweep takes
    them meanwhile); the report says every step came from the cache; ``result.cached_from`` names it."""
    from worker.context import default_device

    try:
        key = job_key(spec, db_shas(spec), default_device())
    except KeyError:
        return False  # an input row is gone: the normal run says so
    hit = finished_job(owner, key, claim.job_id)
    if hit is None:
        return False
    ids = records.reuse_artifacts(claim, owner, hit.job_id, skip=frozenset({"report.json"}),
                                  meta={"cached_from": hit.job_id})
    if ids is None:
        return False  # the source job's artifacts went meanwhile
    report = mark_cached(hit.result.get("report") or {}, hit.job_id)
    report_path = workdir / "report.json"
    report_path.write_text(json.dumps(report, indent=2, default=str))
    ids += records.store_artifacts(claim, owner, {"report.json": ("report", report_path)})
    result = {**hit.result, "artifact_ids": ids, "report": report, "cached_from": hit.job_id}
    records.add_event(claim.job_id, "log", f"identical to job {hit.job_id}: its result reused, no pass run",
                      cached_from=hit.job_id)
    records.finish(claim, "succeeded", result=result, message="succeeded (from the stage cache)")
    return True


def mark_cached(report: dict[str, Any], source: str) -> dict[str, Any]:
    """``report`` (a copy) saying every step came from job ``source``."""
    steps = [{**e, "cached": True, "cached_from": e.get("cached_from") or source} for e in report.get("steps") or []]
    return {**report, "steps": steps, "cached_from": source}


