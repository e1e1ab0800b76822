"""Settings read from MODELPRESS_* environment variables, with embedded defaults under MODELPRESS_HOME."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from models.spec import JobSpec


class Settings(BaseSettings):
    """Everything configurable; defaults run on one machine with no external services."""

    model_config = SettingsConfigDict(env_prefix="MODELPRESS_", env_file=None, extra="ignore")

    home: Path = Field(default_factory=lambda: Path.cwd() / ".modelpress")
    database_url: str = ""
    broker_url: str = ""
    storage_dir: Path | None = None
    # The blob store (storage.backends): file:///folder or s3://bucket/prefix; default a file URL of storage_dir.
    storage_url: str = ""
    # The S3 backend (s3://bucket/prefix): multipart part size and parts sent at once (their product bounds an
    # upload's memory), and the workers' local cache of the blobs they read, bounded in bytes (LRU eviction).
    s3_part_bytes: int = Field(8 * 1024**2, ge=1)
    s3_upload_parallel: int = Field(4, ge=1)  # parts in flight: an upload holds parallel * part bytes at most
    # Artifact downloads from an S3 store answered with a 307 to a presigned GET URL valid this long (0: the
    # API streams the bytes itself), signed for s3_presign_endpoint: the S3 address clients reach (default:
    # the one the API uses, AWS_ENDPOINT_URL).
    s3_presign_s: int = Field(0, ge=0, le=7 * 24 * 3600)
    s3_presign_endpoint: str | None = None
    blob_cache_dir: Path | None = None
    blob_cache_bytes: int = Field(10 * 1024**3, ge=0)
    # None: no cap on an upload's bytes beyond the disk (507) and the owner's stored-bytes quota (413): uploads
    # stream to disk in bounded memory, so an 8 B LLM's 16 GB archive needs no other limit.
    max_upload_bytes: int | None = Field(None, ge=1)
    # The memory of the workers (bytes) that jobs are planned against (models/memory_fit.py): a job over its
    # share is refused at submit, an LLM over the in-memory path's share is streamed. None: the largest live
    # worker's advertised memory (models/workers.py), else this machine's. A worker with it set advertises it.
    worker_memory_bytes: int | None = Field(None, ge=1)
    # JSON request bodies (a job spec), counted while reading: 413 past it.
    max_json_body_bytes: int = Field(1024**2, ge=1)
    owner: str = "local"
    api_key: str | None = None
    # /docs, /redoc, /openapi.json and (without the Bearer key) /metrics; default: public only without api_key.
    public_docs: bool | None = None
    # Signs the pages' login cookie (default: derived from api_key); changing api_key ends every session.
    secret_key: str | None = None
    session_ttl_s: int = 12 * 3600
    # Worker reliability (docs/architecture.md §7): soft < hard < broker visibility timeout.
    task_soft_time_limit: int = 6 * 3600
    task_hard_time_limit: int = 6 * 3600 + 300
    max_attempts: int = 3
    # A running job's worker refreshes jobs.heartbeat_at; a redelivered task reclaims the job only
    # once the heartbeat is older than this (the previous worker is gone).
    job_lease_seconds: int = 60
    cpu_queue: str = "cpu"
    gpu_queue: str = "gpu"
    # Consumed only by workers that found a CUDA device at start (worker/advertise.py): training of a model of
    # cpu_train_max_params or more goes here, and is refused at submit when no live worker has a GPU.
    cuda_queue: str = "cuda"
    cpu_train_max_params: int = Field(1_000_000_000, ge=1)
    # Each worker advertises its queues, memory and GPU (table workers) every worker_heartbeat_s; the API
    # plans against those heard from within worker_live_s (0 turns the heartbeat off).
    worker_heartbeat_s: float = Field(15.0, ge=0)
    worker_live_s: float = Field(60.0, gt=0)
    # GET /v1/jobs/{id} is what clients poll: each API process may serve a body this many seconds old
    # (a terminal job's body never changes and is kept longer). 0 turns the cache off.
    job_read_cache_s: float = 0.25
    # -- deletion, retention, gc, reconciler, streams (branch gc) --------------------------------
    # Retention in days (0 keeps forever): artifacts of succeeded jobs (the job row stays), failed and
    # cancelled jobs with everything they produced, and cache entries (local copies of remote blobs).
    retain_artifacts_days: float = Field(0, ge=0)
    retain_failed_jobs_days: float = Field(30, ge=0)
    retain_cache_days: float = Field(7, ge=0)
    # The stage cache's entries beyond this many bytes (least recently used first) are collected by gc; 0: no bound.
    stage_cache_max_bytes: int = Field(10 * 1024**3, ge=0)
    # The worker runs gc (retention, orphan blobs, leftovers) this often; 0 turns the timer off.
    gc_interval_s: float = Field(3600, ge=0)
    # A staged upload or work folder untouched this long, with no live writer, is a leftover.
    leftover_grace_s: float = Field(60, ge=0)
    # The reconciler (worker/reconcile.py) re-enqueues queued jobs untouched this long, and running jobs
    # whose heartbeat is older than job_lease_seconds, every reconcile_interval_s (0: off).
    reconcile_interval_s: float = Field(30, ge=0)
    reconcile_queued_after_s: float = Field(300, ge=1)
    # An event stream ends after this many seconds (the client resumes with Last-Event-ID); at most
    # stream_max_per_owner streams are open per owner in one API process (429 past it).
    stream_max_s: float = Field(300, gt=0)
    stream_max_per_owner: int = Field(16, ge=1)
    # Per-owner quotas (api/services/quotas.py), the same for every owner; 0 turns one off.
    # Stored bytes count the owner's models, datasets and artifacts (a blob shared with others counts for each).
    quota_stored_bytes: int = Field(0, ge=0)
    # Queued + running (+ cancelling) jobs at a time.
    quota_active_jobs: int = Field(100, ge=0)
    # Per-key token buckets (api/services/ratelimit.py): sustained requests per minute and burst size;
    # a rate of 0 turns the limit off. Shared through Redis when the broker is Redis, else per process.
    upload_rate_per_minute: float = Field(120.0, ge=0)
    upload_rate_burst: int = Field(120, ge=1)
    submit_rate_per_minute: float = Field(120.0, ge=0)
    submit_rate_burst: int = Field(120, ge=1)
    # At most this many job submissions are handled at once per API process (api/services/admission.py);
    # the others wait up to overload_wait_s for a turn, then get a 503 `overloaded` with Retry-After.
    submit_concurrency: int = Field(8, ge=1)
    overload_wait_s: float = Field(10.0, ge=0)
    # One ONNX Runtime run of an uploaded graph may take at most run_max_s (and, once runs were measured,
    # 50x their cost per sample); one phase of such runs (an evaluation, a calibration, auto_exclude's
    # rounds) at most eval_phase_max_s (worker/ort_guard.py).
    run_max_s: float = Field(600.0, gt=0)
    eval_phase_max_s: float = Field(3600.0, gt=0)
    # How long a request waits for a pooled database connection before it is a 503 `overloaded`.
    db_pool_timeout_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError(
                "MODELPRESS_API_KEY is set but empty, which would turn authentication off: "
                "give it a key, or unset it to run without authentication"
            )
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'modelpress.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.home / 'broker.db'}"
        if self.storage_dir is None:
            self.storage_dir = self.home / "storage"
        if not self.storage_url:
            self.storage_url = self.storage_dir.absolute().as_uri()
        if self.task_soft_time_limit >= self.task_hard_time_limit:
            raise ValueError("task_soft_time_limit must be below task_hard_time_limit")
        return self

    @property
    def docs_are_public(self) -> bool:
        """Whether the API docs and /metrics need no key (``public_docs``, else: no api_key configured)."""
        return self.public_docs if self.public_docs is not None else not self.api_key

    @property
    def blob_dir(self) -> Path:
        """Storage root (never None after validation)."""
        assert self.storage_dir is not None
        return self.storage_dir

    @property
    def visibility_timeout(self) -> int:
        """Redis visibility timeout: above the hard limit so a running task is never redelivered."""
        return self.task_hard_time_limit + 600

    def queue_for(self, spec: JobSpec) -> str:
        """The queue a job goes to: the spec's choice, else GPU when it trains, else CPU (API and search alike)."""
        if spec.queue == "gpu" or (spec.queue is None and spec.needs_training()):
            return self.gpu_queue
        return self.cpu_queue


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (tests call get_settings.cache_clear() after changing the environment)."""
    settings = Settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    return settings
