"""Per-owner quotas: stored bytes (413) and active jobs (429), checked by the upload and submit services.

Stored bytes are the sizes of the owner's models, datasets and artifacts: a blob that several owners
refer to counts for each of them (each could keep it alive alone). Active jobs are queued, running and
cancelling ones. The final check runs under a lock held by the inserting transaction until it ends, so
concurrent requests of one owner cannot both slip under a limit: a per-owner advisory lock on PostgreSQL,
the database's write lock on SQLite (``BEGIN IMMEDIATE``: SQLite has one writer, and a deferred
transaction would count with a snapshot older than another writer's commit).
"""

from __future__ import annotations

import hashlib

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from api.errors import ProblemError
from models.settings import Settings
from models.tables import CANCELLING, QUEUED, RUNNING, Artifact, Dataset, Job, Model

ACTIVE = (QUEUED, RUNNING, CANCELLING)


def stored_bytes(session: Session, owner: str) -> int:
    """The bytes ``owner``'s records refer to (models, datasets, artifacts)."""
    total = 0
    for table in (Model, Dataset, Artifact):
        total += int(session.scalar(select(func.coalesce(func.sum(table.size_bytes), 0)).where(table.owner == owner))
                     or 0)
    return total


def active_jobs(session: Session, owner: str) -> int:
    """How many of ``owner``'s jobs are queued, running or cancelling."""
    return int(session.scalar(select(func.count()).select_from(Job).where(Job.owner == owner,
                                                                          Job.status.in_(ACTIVE))) or 0)


def lock_owner(session: Session, owner: str) -> None:
    """Serialise quota checks of ``owner`` until the transaction ends (PostgreSQL: an advisory lock;
    SQLite: the write lock, taken now unless this transaction already wrote)."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        raw = session.connection().connection.driver_connection
        if raw is not None and not raw.in_transaction:  # pysqlite opens transactions only at the first write
            session.execute(text("BEGIN IMMEDIATE"))
        return
    if dialect != "postgresql":
        return
    key = int.from_bytes(hashlib.sha256(f"modelpress quota {owner}".encode()).digest()[:8], "big", signed=True)
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def check_storage(session: Session, owner: str, adding: int, settings: Settings, *, lock: bool = False) -> None:
    """413 ``storage_quota_exceeded`` when ``adding`` more bytes would take ``owner`` past the quota.

    ``lock``: take the owner's lock first (the check right before the insert that it guards)."""
    limit = settings.quota_stored_bytes
    if not limit:
        return
    if lock:
        lock_owner(session, owner)
    usage = stored_bytes(session, owner)
    if usage + adding <= limit:
        return
    raise ProblemError(
        413,
        "storage_quota_exceeded",
        f"storing {adding} more bytes would exceed the stored-bytes quota of owner {owner!r}: "
        f"{usage} of {limit} bytes are in use",
        errors=[{"field": "quota.stored_bytes", "message": f"{usage} of {limit} bytes in use, {adding} requested",
                 "quota": "stored_bytes", "limit": limit, "usage": usage, "requested": adding}],
    )


def check_jobs(session: Session, owner: str, settings: Settings, *, lock: bool = False) -> None:
    """429 ``job_quota_exceeded`` when ``owner`` already has the allowed number of queued + running jobs.

    ``lock``: take the owner's lock first, held until the caller's transaction (that inserts the job) ends."""
    limit = settings.quota_active_jobs
    if not limit:
        return
    if lock:
        lock_owner(session, owner)
    usage = active_jobs(session, owner)
    if usage < limit:
        return
    raise ProblemError(
        429,
        "job_quota_exceeded",
        f"owner {owner!r} has {usage} queued or running jobs, the quota is {limit}: "
        "wait for one to finish (or cancel one), then submit again",
        errors=[{"field": "quota.active_jobs", "message": f"{usage} of {limit} jobs queued or running",
                 "quota": "active_jobs", "limit": limit, "usage": usage}],
    )
