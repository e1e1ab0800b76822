"""SQLAlchemy tables: models, datasets, jobs, job events, artifacts, API keys. Every row has an owner."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column

from models.clock import as_utc

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Job statuses (docs/architecture.md §6). Fine detail lives in ``phase``.
QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "cancelling",
    "succeeded",
    "failed",
    "cancelled",
)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE_STATUSES = frozenset({QUEUED, RUNNING, CANCELLING})
STATUSES = (QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED)


def utcnow() -> datetime:
    """Timezone-aware now, the one clock every row uses."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that stores UTC and always hands back aware UTC datetimes.

    SQLite keeps no zone and returns naive values; PostgreSQL returns them in the session's zone.
    Naive input is taken as UTC. Renders as the same DDL as ``DateTime(timezone=True)``.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else as_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else as_utc(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class UploadedFile:
    """The columns of an uploaded file's row (Model and Dataset): one owner's bytes, stored by content hash."""

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(128))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    @declared_attr.directive
    def __table_args__(cls) -> tuple[Any, ...]:
        # Same bytes from the same owner are one record (uploads dedup on it); a fresh constraint per table.
        return (UniqueConstraint("owner", "sha256"),)


class Model(UploadedFile, Base):
    """An uploaded model file (ONNX graph or Hugging Face archive), stored by content hash."""

    __tablename__ = "models"


class Dataset(UploadedFile, Base):
    """An uploaded dataset (npz arrays, image folder archive, or JSONL/CSV text), stored by content hash."""

    __tablename__ = "datasets"


class Job(Base):
    """One optimization job: the spec, where it is, and what it produced."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key"),
        Index("ix_jobs_owner_status_id", "owner", "status", "id"),
        Index("ix_jobs_owner_name", "owner", "name"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default=QUEUED)
    phase: Mapped[str] = mapped_column(String(128), default="queued")
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    queue: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # DELETE of an active job: cancel first, then the row goes once terminal (worker.gc finishes it).
    delete_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    # How often the reconciler re-sent this job while queued (each re-send waits twice as long as the last).
    resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The submitter's label and free string key/values (``GET /v1/jobs?name=&meta=k=v`` filters on them).
    name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)
    # A search's trial: the search job that created it (same owner); None for every other job.
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), nullable=True, index=True)


class JobEvent(Base):
    """An append-only event of a job; ``id`` is a global sequence, used as the SSE event id."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    ts: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Artifact(Base):
    """A file a job produced; (job_id, name) is unique so a re-run overwrites instead of duplicating."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(32))
    media_type: Mapped[str] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(128))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class BlobClaim(Base):
    """A short-lived claim on a blob key: ``write`` while an upload commits and indexes it, ``delete``
    while a sweep checks and removes it. Each side writes its claim, then looks for the other's (so
    one of them always sees the other): an upload never indexes a blob a sweep is removing."""

    __tablename__ = "blob_claims"
    __table_args__ = (Index("ix_blob_claims_key", "key"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(128))
    purpose: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class BlobOrphan(Base):
    """A blob key whose last record may be gone: written in the transaction that deletes the record,
    removed once the blob is swept (or found referenced again), so a crash in between leaks nothing."""

    __tablename__ = "blob_orphans"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    since: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


# API key scopes, each including the ones before it: read (GET/HEAD), write (+ uploads, jobs), admin (+ /v1/keys).
SCOPES = ("read", "write", "admin")


class ApiKey(Base):
    """A per-owner API key: only the sha256 of its secret is stored; ``revoked_at`` set means it no longer works."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    scope: Mapped[str] = mapped_column(String(16))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class StageCacheEntry(Base):
    """A stage-cache entry (worker.stage_cache): one owner's working model after a pipeline prefix
    (``kind='stage'``, the ONNX file in ``blob_key``, the step's report entry in ``entry``), or a whole
    finished job (``kind='job'``, ``job_id`` names it). ``key`` is the sha256 of what determines it."""

    __tablename__ = "stage_cache"
    __table_args__ = (UniqueConstraint("owner", "key"), Index("ix_stage_cache_last_used_at", "last_used_at"))

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))
    blob_key: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    entry: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # the job that wrote it (not a foreign key: a stage entry outlives its job)
    job_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WorkerRecord(Base):
    """A live worker's advertisement (``models.workers``): its queues, memory and GPU, refreshed by its
    heartbeat; the API plans admission and routing against the live ones (docs/architecture.md §7)."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # celery hostname:pid
    hostname: Mapped[str] = mapped_column(String(255))
    queues: Mapped[list[Any]] = mapped_column(JSON, default=list)
    memory_total: Mapped[int] = mapped_column(BigInteger)
    memory_free: Mapped[int] = mapped_column(BigInteger)
    gpu_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    gpu_count: Mapped[int] = mapped_column(Integer, default=0)
    gpu_memory: Mapped[int] = mapped_column(BigInteger, default=0)  # the largest device's total bytes
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
