"""API response and request bodies (pydantic), shared by the API and the client SDK."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    computed_field,
    field_validator,
)

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
    # True on an upload answered with the existing record (same bytes, same owner); its name is the first one.
    deduplicated: bool = False


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
    deduplicated: bool = False  # as ModelOut.deduplicated


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
    # The finished job this one repeated: its result was reused from the stage cache, no pass ran.
    cached_from: str | None = None
    # A search: the winning trial ({trial, job_id, label, steps, metric, size_bytes, latency_ms}).
    best: dict[str, Any] | None = None


class Timestamps(BaseModel):
    created_at: UTCTimestamp
    updated_at: UTCTimestamp
    started_at: UTCTimestamp | None = None
    finished_at: UTCTimestamp | None = None


MAX_METADATA_KEYS = 32
# No NUL (PostgreSQL text cannot hold it); a job's name and metadata are labels, never paths.
JobName = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\x00]+$")]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00=]+$")]
MetadataValue = Annotated[str, StringConstraints(max_length=512, pattern=r"^[^\x00]*$")]


class JobLabels(BaseModel):
    """What a submitter may attach to a job besides its spec: a name and free string key/values."""

    name: JobName | None = None
    metadata: dict[MetadataKey, MetadataValue] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _few_keys(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} keys")
        return value


class JobCreate(JobSpec, JobLabels):
    """``POST /v1/jobs``'s body: a JobSpec plus the job's optional ``name`` and ``metadata``."""

    def split(self) -> tuple[JobSpec, JobLabels]:
        """The spec (what the worker runs) and the labels (what the job is called), apart."""
        labels = JobLabels(name=self.name, metadata=self.metadata)
        spec = JobSpec.model_validate(self.model_dump(exclude={"name", "metadata"}))
        return spec, labels


class JobOut(BaseModel):
    id: str
    name: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
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


# An owner name: what rows are scoped by (letters, digits, ``.``, ``_``, ``@``, ``-``; at most 64).
OWNER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"


class KeyCreate(BaseModel):
    """``POST /v1/keys``: a new API key for ``owner`` with ``scope`` (read, write or admin)."""

    model_config = ConfigDict(extra="forbid")

    owner: str = Field(pattern=OWNER_PATTERN)
    scope: Literal["read", "write", "admin"] = "write"
    name: str = Field("", max_length=255, pattern=r"^[^\x00]*$")


_MANAGES = ("Whose keys this key may manage: '*' (every owner) for the admin scope, which is global whatever "
            "the key's owner label; none for read and write keys")


class KeyOut(_Out):
    """An API key as listed: never its secret."""

    id: str
    owner: str
    name: str
    scope: str
    created_at: UTCTimestamp
    last_used_at: UTCTimestamp | None = None
    revoked_at: UTCTimestamp | None = None

    @computed_field(description=_MANAGES)  # type: ignore[prop-decorator]
    @property
    def manages_keys_of(self) -> str | None:
        """``*`` for an admin key (it makes and revokes keys of any owner), None otherwise."""
        return "*" if self.scope == "admin" else None


class KeyCreated(KeyOut):
    """A key just created: ``key`` is shown this once and never stored (only its sha256 is)."""

    key: str
