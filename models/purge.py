"""Removing records in one transaction, noting the blob keys they held as orphans for the sweep.

Shared by the API's DELETE endpoints (api/services/deletion.py) and the worker's gc (worker/gc.py):
rows first, in the caller's transaction; blobs only afterwards, by ``models.blobs.sweep_key`` once no
record of any owner refers to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from models.blobs import mark_orphans
from models.tables import Artifact, Dataset, Job, JobEvent, Model


@dataclass
class Purged:
    """Records removed and the blob keys they referred to (to be swept after the commit)."""

    jobs: int = 0
    artifacts: int = 0
    events: int = 0
    models: int = 0
    datasets: int = 0
    keys: set[str] = field(default_factory=set)

    @property
    def records(self) -> int:
        return self.jobs + self.artifacts + self.events + self.models + self.datasets

    def add(self, other: Purged) -> None:
        self.jobs += other.jobs
        self.artifacts += other.artifacts
        self.events += other.events
        self.models += other.models
        self.datasets += other.datasets
        self.keys |= other.keys


def _count(result: object) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def purge_artifacts(s: Session, artifact_ids: Sequence[str]) -> Purged:
    """Delete artifact rows; their keys become orphans."""
    if not artifact_ids:
        return Purged()
    keys = set(s.scalars(select(Artifact.storage_key).where(Artifact.id.in_(artifact_ids))))
    n = _count(s.execute(delete(Artifact).where(Artifact.id.in_(artifact_ids)).execution_options(synchronize_session=False)))
    mark_orphans(s, keys)
    return Purged(artifacts=n, keys=keys)


def purge_jobs(s: Session, job_ids: Sequence[str]) -> Purged:
    """Delete jobs with their events and artifacts; the artifacts' keys become orphans."""
    if not job_ids:
        return Purged()
    art_ids = list(s.scalars(select(Artifact.id).where(Artifact.job_id.in_(job_ids))))
    out = purge_artifacts(s, art_ids)
    # a search's trials and a multi-task job's baselines stay, as jobs of their own (a cached baseline may stand
    # for another job's); the parent row could not go while they point at it
    s.execute(update(Job).where(Job.parent_id.in_(job_ids)).values(parent_id=None)
              .execution_options(synchronize_session=False))
    out.events = _count(s.execute(delete(JobEvent).where(JobEvent.job_id.in_(job_ids)).execution_options(synchronize_session=False)))
    out.jobs = _count(s.execute(delete(Job).where(Job.id.in_(job_ids)).execution_options(synchronize_session=False)))
    return out


def purge_upload(s: Session, row: Model | Dataset) -> Purged:
    """Delete a model or dataset row; its key becomes an orphan."""
    table = type(row)
    s.execute(delete(table).where(table.id == row.id).execution_options(synchronize_session=False))
    mark_orphans(s, [row.storage_key])
    if isinstance(row, Model):
        return Purged(models=1, keys={row.storage_key})
    return Purged(datasets=1, keys={row.storage_key})
