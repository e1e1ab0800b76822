"""API response and request bodies (pydantic), shared by the API and the client SDK."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from models.clock import as_utc
from models.spec import JobSpec

T = TypeVar("T")


# A timestamp in API JSON: always aware UTC (naive input is taken as UTC), so it serializes ending in ``Z``.
UTCTimestamp = Annotated[datetime, AfterValidator(as_utc)]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class TensorInfo(BaseModel):
    name: str
    dtype: str
    shape: list[int | str | None]


class ModelOut(_Out):
    id: str
    name: str
    format: str
    sha256: str
    size_bytes: int
    inputs: list[TensorInfo] = Field(default_factory=list)
    outputs: list[TensorInfo] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)
    created_at: UTCTimestamp


class DatasetOut(_Out):
    id: str
    name: str
    format: str
    sha256: str
    size_bytes: int
    num_samples: int
    fields: dict[str, Any] = Field(default_factory=dict)
    classes: list[str] | None = None
    meta: dict[str, Any] = Field(default_factory=dict)
    created_at: UTCTimestamp


class Progress(BaseModel):
    step: int = 0
    steps: int = 0
    percent: float = 0.0
    epoch: int | None = None
    epochs: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)


class JobError(BaseModel):
    code: str
    message: str
    step: str | None = None


class ArtifactOut(_Out):
    id: str
    job_id: str
    name: str
    kind: str
    media_type: str
    sha256: str
    size_bytes: int
    meta: dict[str, Any] = Field(default_factory=dict)
    created_at: UTCTimestamp
    url: str = ""


class JobResult(BaseModel):
    artifacts: list[ArtifactOut] = Field(default_factory=list)
    report: dict[str, Any] = Field(default_factory=dict)
    # A latency or size regression against the input: {code: slower_than_input | larger_than_input, message, ratio}.
    warnings: list[dict[str, Any]] = Field(default_factory=list)
    # A search: the winning trial ({trial, job_id, label, steps, metric, size_bytes, latency_ms}).
    best: dict[str, Any] | None = None


class Timestamps(BaseModel):
    created_at: UTCTimestamp
    updated_at: UTCTimestamp
    started_at: UTCTimestamp | None = None
    finished_at: UTCTimestamp | None = None


class JobOut(BaseModel):
    id: str
    status: str
    phase: str
    progress: Progress
    attempt: int
    queue: str
    error: JobError | None = None
    result: JobResult | None = None
    spec: JobSpec
    timestamps: Timestamps


class EventOut(_Out):
    id: int
    job_id: str
    ts: UTCTimestamp
    kind: str
    message: str
    data: dict[str, Any] = Field(default_factory=dict)


class Page(BaseModel, Generic[T]):
    data: list[T]
    next_cursor: str | None = None


class PassInfo(BaseModel):
    type: str
    description: str
    takes: str
    schema_: dict[str, Any] = Field(alias="schema")

    model_config = ConfigDict(populate_by_name=True)


class Problem(BaseModel):
    """RFC 9457 problem details, plus ``code`` and, for validation, ``errors`` with field paths."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None
