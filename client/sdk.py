"""The modelpress ``Client``: uploads, job submission, and lazy listings over the v1 HTTP API.

Format inference for uploads (pass ``format=`` to override):

- models: ``.onnx`` -> ``onnx``; ``.zip`` / ``.tar.gz`` / ``.tgz`` / ``.tar`` (a Hugging Face
  folder with ``config.json`` + safetensors, archived) -> ``hf``.
- datasets: ``.npz`` -> ``npz``; ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` -> ``text``;
  ``.zip`` / ``.tar.gz`` / ``.tgz`` / ``.tar`` (one folder per class) -> ``imagefolder``.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypedDict, TypeVar, Unpack

import httpx
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from client.errors import APIError, spec_validation_error
from client.jobs import Job, TransferProgress, job_from_response
from client.transport import CHUNK, RetryPolicy, Transport
from models.formats import ARCHIVE_SUFFIXES, MODEL_FORMATS
from models.schemas import ArtifactOut, DatasetOut, JobOut, ModelOut
from models.spec import JobSpec

M = TypeVar("M", bound=BaseModel)

_ARCHIVE_SUFFIXES = ARCHIVE_SUFFIXES
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".pt2")
# The server's words (api/inspection/wrong_format.py), said before a byte is sent.
PICKLE_REFUSED = (
    "PyTorch pickles (torch.save) are refused: loading one runs code. Export the model to ONNX "
    "(torch.onnx.export(model, (example_input,), 'model.onnx'); upload model.onnx, zipped with model.onnx.data "
    "when the exporter writes one) or save it as safetensors with its config.json (transformers: "
    "save_pretrained) and upload that folder as a zip, --format hf"
)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".tar.gz", *_ARCHIVE_SUFFIXES, ".onnx", ".npz", ".jsonl", ".json", ".csv", ".tsv"):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _archive_names(path: Path) -> list[str]:
    """The member names of a zip or tar archive (empty when it cannot be read: the server will say why)."""
    import tarfile
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                return zf.namelist()
        with tarfile.open(path, "r:*") as tf:
            return tf.getnames()
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError):
        return []


def infer_model_format(path: str | Path) -> str:
    """``onnx`` for ``.onnx`` or an archive holding a ``.onnx`` file and no ``config.json`` (an ONNX model with
    its external data), ``hf`` for another archive (a Hugging Face folder)."""
    suffix = _suffix(Path(path))
    if suffix in _PICKLE_SUFFIXES:
        raise ValueError(f"{Path(path).name}: {PICKLE_REFUSED}")
    members = _archive_names(Path(path)) if suffix in _ARCHIVE_SUFFIXES else []
    for fmt in MODEL_FORMATS.values():  # the format table's rows, asked in order
        if fmt.claims(suffix, members):
            return fmt.name
    raise ValueError(f"cannot infer the model format of {Path(path).name!r}; pass format= ({' or '.join(MODEL_FORMATS)})")


def infer_dataset_format(path: str | Path) -> str:
    """``npz``, ``text`` (JSONL/CSV/TSV) or ``imagefolder`` (an archive of class folders)."""
    suffix = _suffix(Path(path))
    if suffix == ".npz":
        return "npz"
    if suffix in (".jsonl", ".json", ".csv", ".tsv"):
        return "text"
    if suffix in _ARCHIVE_SUFFIXES:
        return "imagefolder"
    raise ValueError(
        f"cannot infer the dataset format of {Path(path).name!r}; pass format= (npz, text or imagefolder)"
    )


_RECORDS: dict[str, tuple[type[BaseModel], Callable[[str | Path], str]]] = {
    "models": (ModelOut, infer_model_format),
    "datasets": (DatasetOut, infer_dataset_format),
}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class UploadOptions(TypedDict, total=False):
    """Keyword options of ``upload_model`` / ``upload_dataset``."""

    name: str | None  # the record's name (default: the file's name)
    on_progress: TransferProgress | None  # called with (bytes sent, total bytes)
    skip_existing: bool  # look the sha256 up first and skip the upload when the server has the bytes


class Client:
    """A modelpress API client (``with Client() as mp: ...``); retries connection errors and 503."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.25,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._transport = Transport(base_url, api_key, timeout, RetryPolicy(retries, backoff), transport)

    @property
    def base_url(self) -> str:
        return self._transport.base_url

    @property
    def api_key(self) -> str | None:
        return self._transport.api_key

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool."""
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- models and datasets ---------------------------------------------------------------------

    def _find_by_sha(self, url: str, sha256: str, schema: type[M]) -> M | None:
        """The server's record for these bytes, if it has one (``GET ...?sha256=``); None when unsure."""
        try:
            page = self._transport.get_json(url, {"sha256": sha256, "limit": 100})
        except APIError:
            return None  # the filter is not supported: upload (the server deduplicates anyway)
        for item in page.get("data", []):
            if item.get("sha256") == sha256:
                return schema.model_validate(item)
        return None

    def upload(
        self, kind: str, path: str | Path, format: str | None = None, **options: Unpack[UploadOptions]
    ) -> Any:
        """Upload a file as ``kind`` ``models`` or ``datasets`` (streamed); the existing record if the server has it."""
        if kind not in _RECORDS:
            raise ValueError(f"unknown kind {kind!r}: models or datasets")
        schema, infer = _RECORDS[kind]
        url = f"/v1/{kind}"
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(path)
        fmt = format or infer(path)
        size = path.stat().st_size
        on_progress = options.get("on_progress")
        if options.get("skip_existing", True):
            found = self._find_by_sha(url, file_sha256(path), schema)
            # Held as another format: upload anyway, the server's 409 names both formats.
            if found is not None and getattr(found, "format", fmt) == fmt:
                if on_progress:
                    on_progress(size, size)
                return found.model_copy(update={"deduplicated": True})

        def body() -> Iterator[bytes]:
            sent = 0
            if on_progress:
                on_progress(0, size)
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    sent += len(chunk)
                    yield chunk
                    if on_progress:
                        on_progress(sent, size)

        response = self._transport.send(
            "PUT",
            url,
            params={"name": options.get("name") or path.name, "format": fmt},
            content=body,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            timeout=self._transport.long_timeout(600.0),
        )
        return schema.model_validate(response.json())

    def upload_model(self, path: str | Path, format: str | None = None, **options: Unpack[UploadOptions]) -> ModelOut:
        """Upload a model file (streamed); returns the existing record when the server holds the bytes."""
        record: ModelOut = self.upload("models", path, format, **options)
        return record

    def upload_dataset(
        self, path: str | Path, format: str | None = None, **options: Unpack[UploadOptions]
    ) -> DatasetOut:
        """Upload a dataset file (streamed); returns the existing record when the server holds the bytes."""
        record: DatasetOut = self.upload("datasets", path, format, **options)
        return record

    def models(self, limit: int = 100) -> Iterator[ModelOut]:
        """Every model, lazily across pages."""
        return (ModelOut.model_validate(item) for item in self._transport.paginate("/v1/models", limit=limit))

    def datasets(self, limit: int = 100) -> Iterator[DatasetOut]:
        """Every dataset, lazily across pages."""
        return (DatasetOut.model_validate(item) for item in self._transport.paginate("/v1/datasets", limit=limit))

    # -- jobs ------------------------------------------------------------------------------------

    @staticmethod
    def build_spec(spec: Mapping[str, Any] | JobSpec) -> JobSpec:
        """Validate a spec locally (same pydantic model as the server); raise APIValidationError naming fields."""
        if isinstance(spec, JobSpec):
            return spec
        try:
            return JobSpec.model_validate(dict(spec))
        except PydanticValidationError as exc:
            raise spec_validation_error(exc) from exc

    def submit(
        self,
        spec: Mapping[str, Any] | JobSpec,
        idempotency_key: str | None = None,
        *,
        name: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Job:
        """Submit a job; an idempotency key (generated when not given) makes retries safe.

        ``name`` and ``metadata`` (string key/values, filterable in ``jobs()``) label the job; a spec mapping
        may carry them too (top-level ``name`` / ``metadata``), the arguments win.
        """
        labels: dict[str, Any] = {}
        if not isinstance(spec, JobSpec):
            spec = dict(spec)
            labels = {k: spec.pop(k) for k in ("name", "metadata") if k in spec}
        if name is not None:
            labels["name"] = name
        if metadata:
            labels["metadata"] = {**(labels.get("metadata") or {}), **metadata}
        body = {**self.build_spec(spec).model_dump(mode="json", exclude_none=True), **labels}
        key = idempotency_key or uuid.uuid4().hex
        response = self._transport.send(
            "POST", "/v1/jobs", json_body=body, headers={"Idempotency-Key": key}, retry=True
        )
        return Job(self._transport, job_from_response(self._transport, response))

    def job(self, job_id: str) -> Job:
        """One job by id."""
        return Job(self._transport, JobOut.model_validate(self._transport.get_json(f"/v1/jobs/{job_id}")))

    def jobs(
        self,
        status: str | None = None,
        limit: int = 50,
        *,
        name: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Iterator[Job]:
        """Every job (newest first, as the server orders them), lazily across pages; filtered by status, name
        and metadata key/values (all must match)."""
        params: dict[str, Any] = {"status": status, "name": name}
        if metadata:
            params["meta"] = [f"{k}={v}" for k, v in metadata.items()]
        for item in self._transport.paginate("/v1/jobs", params, limit):
            yield Job(self._transport, JobOut.model_validate(item))

    def artifact(self, artifact_id: str) -> ArtifactOut:
        """One artifact's metadata."""
        return ArtifactOut.model_validate(self._transport.get_json(f"/v1/artifacts/{artifact_id}"))
