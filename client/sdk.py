"""The modelpress Python SDK: a thin, typed, retrying client over the v1 HTTP API.

Format inference for uploads (pass ``format=`` to override):

- models: ``.onnx`` -> ``onnx``; ``.zip`` / ``.tar.gz`` / ``.tgz`` / ``.tar`` (a Hugging Face
  folder with ``config.json`` + safetensors, archived) -> ``hf``.
- datasets: ``.npz`` -> ``npz``; ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` -> ``text``;
  ``.zip`` / ``.tar.gz`` / ``.tgz`` / ``.tar`` (one folder per class) -> ``imagefolder``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from client.errors import (
    ApiError,
    ConnectionFailed,
    IntegrityError,
    JobCancelled,
    JobFailed,
    ServiceUnavailable,
    ValidationError,
    error_for,
)
from models.schemas import ArtifactOut, DatasetOut, EventOut, JobOut, ModelOut
from models.spec import JobSpec, step_types

DEFAULT_URL = "http://127.0.0.1:8000"
CHUNK = 1024 * 1024
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
RETRY_STATUSES = frozenset({503})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})

UploadProgress = Callable[[int, int], None]
JobProgress = Callable[["Job"], None]
M = TypeVar("M", bound=BaseModel)

_ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")


class WaitTimeout(TimeoutError):
    """``Job.wait`` gave up before the job reached a terminal state."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".tar.gz", *_ARCHIVE_SUFFIXES, ".onnx", ".npz", ".jsonl", ".json", ".csv", ".tsv"):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def infer_model_format(path: str | Path) -> str:
    """``onnx`` for ``.onnx``, ``hf`` for an archive of a Hugging Face folder."""
    suffix = _suffix(Path(path))
    if suffix == ".onnx":
        return "onnx"
    if suffix in _ARCHIVE_SUFFIXES:
        return "hf"
    raise ValueError(f"cannot infer the model format of {Path(path).name!r}; pass format= (onnx or hf)")


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


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _safe_relpath(name: str) -> Path:
    """A server-supplied artifact name as a relative path that cannot escape the destination."""
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("", ".", "/")]
    if not parts or any(p == ".." for p in parts):
        raise ValueError(f"unsafe artifact name: {name!r}")
    return Path(*parts)


_STEP_IN_MESSAGE = re.compile(r"^(?:Value error, )?(steps\.\d+):\s*(.*)$", re.S)


def _field_error(err: Any) -> dict[str, Any]:
    """A local pydantic error in the server's shape: ``{field, message}`` (``steps.1`` from the message)."""
    loc = list(err.get("loc", ()))
    tags = set(step_types())
    parts = [
        str(p) for i, p in enumerate(loc)
        if not (isinstance(p, str) and (p[:1].isupper() or (p in tags and i >= 2 and loc[i - 2] == "steps")))
    ]
    field = ".".join(parts)
    message = str(err.get("msg", "invalid value"))
    match = _STEP_IN_MESSAGE.match(message)
    if match and not field:
        field, message = match.group(1), match.group(2)
    elif message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return {"field": field or "spec", "message": message}


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
        self.base_url = (base_url or os.environ.get("MODELPRESS_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("MODELPRESS_API_KEY") or None
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        headers = {"User-Agent": "modelpress-sdk/0.1", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------------

    def _sleep_before_retry(self, attempt: int, response: httpx.Response | None = None) -> None:
        delay = min(self.backoff * (2**attempt), 8.0) * (0.5 + random.random() / 2)
        if response is not None:
            retry_after = response.headers.get("Retry-After", "")
            if retry_after.isdigit():
                delay = min(float(retry_after), 30.0)
        time.sleep(delay)

    def _send(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        content: Callable[[], Any] | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool | None = None,
        stream: bool = False,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        """Send a request; retry connection errors and 503 when it is safe; raise typed errors."""
        may_retry = method.upper() in IDEMPOTENT_METHODS if retry is None else retry
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        attempt = 0
        while True:
            request = self._http.build_request(
                method,
                url,
                params=clean or None,
                json=json_body,
                content=content() if content is not None else None,
                headers=dict(headers or {}),
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if may_retry and attempt < self.retries:
                    self._sleep_before_retry(attempt)
                    attempt += 1
                    continue
                raise ConnectionFailed(f"cannot reach {self.base_url}: {exc!r}") from exc
            if response.status_code in RETRY_STATUSES and may_retry and attempt < self.retries:
                response.close()
                self._sleep_before_retry(attempt, response)
                attempt += 1
                continue
            if response.status_code >= 400:
                raise self._error(response)
            return response

    @staticmethod
    def _error(response: httpx.Response) -> ApiError:
        with contextlib.suppress(httpx.StreamError):
            response.read()
        response.close()
        body: Any = None
        with contextlib.suppress(ValueError):
            body = response.json()
        return error_for(response.status_code, body, response.text[:500] if body is None else "")

    def _get_json(self, url: str, params: Mapping[str, Any] | None = None) -> Any:
        return self._send("GET", url, params=params).json()

    def _paginate(self, url: str, params: Mapping[str, Any], limit: int) -> Iterator[dict[str, Any]]:
        """Yield every item of a cursor-paginated list, fetching the next page only when needed."""
        after: str | None = params.get("after")
        while True:
            page = self._get_json(url, {**params, "after": after, "limit": limit})
            yield from page.get("data", [])
            after = page.get("next_cursor")
            if not after:
                return

    # -- models and datasets ---------------------------------------------------------------------

    def _find_by_sha(self, url: str, sha256: str, schema: type[M]) -> M | None:
        """The server's record for these bytes, if it has one (``GET ...?sha256=``); None when unsure."""
        try:
            page = self._get_json(url, {"sha256": sha256, "limit": 100})
        except ApiError:
            return None  # the filter is not supported: upload (the server deduplicates anyway)
        for item in page.get("data", []):
            if item.get("sha256") == sha256:
                return schema.model_validate(item)
        return None

    def _upload(
        self,
        url: str,
        path: str | Path,
        fmt: str,
        name: str | None,
        on_progress: UploadProgress | None,
        schema: type[M],
        skip_existing: bool,
    ) -> M:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(path)
        size = path.stat().st_size
        if skip_existing:
            found = self._find_by_sha(url, file_sha256(path), schema)
            if found is not None:
                if on_progress:
                    on_progress(size, size)
                return found

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

        response = self._send(
            "PUT",
            url,
            params={"name": name or path.name, "format": fmt},
            content=body,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            timeout=httpx.Timeout(self.timeout, read=max(self.timeout, 600.0)),
        )
        return schema.model_validate(response.json())

    def upload_model(
        self,
        path: str | Path,
        format: str | None = None,
        name: str | None = None,
        on_progress: UploadProgress | None = None,
        skip_existing: bool = True,
    ) -> ModelOut:
        """Upload a model file (streamed); returns the existing record when the server holds the bytes."""
        fmt = format or infer_model_format(path)
        return self._upload("/v1/models", path, fmt, name, on_progress, ModelOut, skip_existing)

    def upload_dataset(
        self,
        path: str | Path,
        format: str | None = None,
        name: str | None = None,
        on_progress: UploadProgress | None = None,
        skip_existing: bool = True,
    ) -> DatasetOut:
        """Upload a dataset file (streamed); returns the existing record when the server holds the bytes."""
        fmt = format or infer_dataset_format(path)
        return self._upload("/v1/datasets", path, fmt, name, on_progress, DatasetOut, skip_existing)

    def models(self, limit: int = 100) -> Iterator[ModelOut]:
        """Every model, lazily across pages."""
        for item in self._paginate("/v1/models", {}, limit):
            yield ModelOut.model_validate(item)

    def datasets(self, limit: int = 100) -> Iterator[DatasetOut]:
        """Every dataset, lazily across pages."""
        for item in self._paginate("/v1/datasets", {}, limit):
            yield DatasetOut.model_validate(item)

    # -- jobs ------------------------------------------------------------------------------------

    @staticmethod
    def build_spec(spec: Mapping[str, Any] | JobSpec) -> JobSpec:
        """Validate a spec locally (same pydantic model as the server); raise ValidationError naming fields."""
        if isinstance(spec, JobSpec):
            return spec
        try:
            return JobSpec.model_validate(dict(spec))
        except PydanticValidationError as exc:
            errors = [_field_error(e) for e in exc.errors()]
            detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
            raise ValidationError(422, detail, code="invalid_spec", errors=errors) from exc

    def submit(self, spec: Mapping[str, Any] | JobSpec, idempotency_key: str | None = None) -> Job:
        """Submit a job; an idempotency key (generated when not given) makes retries safe."""
        body = self.build_spec(spec).model_dump(mode="json", exclude_none=True)
        key = idempotency_key or uuid.uuid4().hex
        response = self._send("POST", "/v1/jobs", json_body=body, headers={"Idempotency-Key": key}, retry=True)
        data: Any = None
        with contextlib.suppress(ValueError):
            data = response.json()
        if isinstance(data, dict) and "status" in data and "spec" in data:
            return Job(self, JobOut.model_validate(data))
        location = response.headers.get("Location")
        job_id = data.get("id") if isinstance(data, dict) else None
        if not location and not job_id:
            raise ApiError(response.status_code, "the server did not say which job it created")
        return Job(self, JobOut.model_validate(self._get_json(location or f"/v1/jobs/{job_id}")))

    def job(self, job_id: str) -> Job:
        """One job by id."""
        return Job(self, JobOut.model_validate(self._get_json(f"/v1/jobs/{job_id}")))

    def jobs(self, status: str | None = None, limit: int = 50) -> Iterator[Job]:
        """Every job (newest first, as the server orders them), lazily across pages."""
        for item in self._paginate("/v1/jobs", {"status": status}, limit):
            yield Job(self, JobOut.model_validate(item))

    def artifact(self, artifact_id: str) -> ArtifactOut:
        """One artifact's metadata."""
        return ArtifactOut.model_validate(self._get_json(f"/v1/artifacts/{artifact_id}"))


def _parse_sse(lines: Iterator[str]) -> Iterator[tuple[str | None, str, str]]:
    """(id, event, data) for each Server-Sent Event in ``lines`` (the WHATWG parsing rules, simplified)."""
    event_id: str | None = None
    event = "message"
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                yield event_id, event, "\n".join(data)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
        elif field == "id":
            event_id = value
    # An event without its terminating blank line was cut off: drop it (it will be resent on resume).


class Job:
    """A job as last seen by the client; attributes come from the server's JobOut."""

    def __init__(self, client: Client, data: JobOut) -> None:
        self._client = client
        self.data = data

    def __getattr__(self, name: str) -> Any:
        if name == "data":
            raise AttributeError(name)
        return getattr(self.data, name)

    def __repr__(self) -> str:
        return f"Job(id={self.data.id!r}, status={self.data.status!r}, phase={self.data.phase!r})"

    @property
    def id(self) -> str:
        return self.data.id

    @property
    def status(self) -> str:
        return self.data.status

    @property
    def done(self) -> bool:
        """Whether the job reached a terminal state."""
        return self.data.status in TERMINAL

    def refresh(self) -> Job:
        """Fetch the job's current state from the server."""
        self.data = JobOut.model_validate(self._client._get_json(f"/v1/jobs/{self.id}"))
        return self

    def raise_for_status(self) -> Job:
        """Raise JobFailed / JobCancelled for a failed or cancelled job; return self otherwise."""
        if self.status == "failed":
            err = self.data.error
            raise JobFailed(self, err.code if err else "failed", err.message if err else "", err.step if err else None)
        if self.status == "cancelled":
            raise JobCancelled(self)
        return self

    def wait(
        self,
        timeout: float | None = None,
        on_progress: JobProgress | None = None,
        poll: float = 0.5,
    ) -> Job:
        """Poll until the job is terminal; call ``on_progress(job)`` on each change; raise on failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: Any = None
        while True:
            if seen is not None:
                self.refresh()
            state = (self.data.status, self.data.phase, self.data.progress.model_dump(mode="json"))
            if on_progress is not None and state != seen:
                on_progress(self)
            seen = state
            if self.done:
                return self.raise_for_status()
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {self.id} is still {self.status} ({self.data.phase}) after {timeout}s")
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    def cancel(self) -> Job:
        """Ask the server to cancel the job (cooperative; safe to repeat, so it is retried)."""
        response = self._client._send("POST", f"/v1/jobs/{self.id}/cancel", retry=True)
        data: Any = None
        with contextlib.suppress(ValueError):
            data = response.json()
        if isinstance(data, dict) and "status" in data and "spec" in data:
            self.data = JobOut.model_validate(data)
        else:
            self.refresh()
        return self

    # -- events ----------------------------------------------------------------------------------

    def events(self, follow: bool = False, after: int | None = None) -> Iterator[EventOut]:
        """The job's events in order; with ``follow``, stream them (SSE) until the job is terminal."""
        if follow:
            yield from self._follow(after)
            return
        yield from self._page_events(after)

    def _page_events(self, after: int | None) -> Iterator[EventOut]:
        cursor: Any = after
        last = after if after is not None else -1
        while True:
            page = self._client._get_json(f"/v1/jobs/{self.id}/events", {"after": cursor})
            for item in page.get("data", []):
                ev = EventOut.model_validate(item)
                if ev.id > last:
                    last = ev.id
                    yield ev
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def _follow(self, after: int | None) -> Iterator[EventOut]:
        last = after if after is not None else -1
        failures = 0
        client = self._client
        stream_timeout = httpx.Timeout(client.timeout, read=max(60.0, client.timeout))
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last >= 0:
                headers["Last-Event-ID"] = str(last)
            progressed = False
            try:
                response = client._send(
                    "GET", f"/v1/jobs/{self.id}/events/stream", headers=headers, stream=True, timeout=stream_timeout
                )
                try:
                    for _id, _kind, data in _parse_sse(response.iter_lines()):
                        try:
                            ev = EventOut.model_validate_json(data)
                        except PydanticValidationError:
                            continue  # a keep-alive or control event
                        if ev.id <= last:
                            continue
                        last = ev.id
                        progressed = True
                        failures = 0
                        yield ev
                finally:
                    response.close()
            except (httpx.TransportError, ConnectionFailed, ServiceUnavailable):
                pass  # dropped: resume below with Last-Event-ID
            self.refresh()
            if self.done:
                # The stream closes once the job is terminal; pick up anything sent after the drop.
                yield from self._page_events(last if last >= 0 else None)
                return
            if not progressed:
                failures += 1
                if failures > client.retries + 2:
                    raise ConnectionFailed(f"event stream of job {self.id} keeps dropping")
                client._sleep_before_retry(min(failures, 4))

    # -- artifacts -------------------------------------------------------------------------------

    @property
    def artifacts(self) -> list[ArtifactOut]:
        """The artifacts the job produced (empty until it has some)."""
        return list(self.data.result.artifacts) if self.data.result else []

    @property
    def report(self) -> dict[str, Any]:
        """The job's report (empty until it has one)."""
        return dict(self.data.result.report) if self.data.result else {}

    def download(self, dest_dir: str | Path, on_progress: UploadProgress | None = None) -> list[Path]:
        """Download every artifact into ``dest_dir``, verifying each sha256; return the paths written."""
        if not self.artifacts:
            self.refresh()
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        return [self._download_one(art, dest, on_progress) for art in self.artifacts]

    def _download_one(self, art: ArtifactOut, dest: Path, on_progress: UploadProgress | None) -> Path:
        client = self._client
        target = dest / _safe_relpath(art.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        url = art.url or f"/v1/artifacts/{art.id}/content"
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
        h = hashlib.sha256()
        written = 0
        attempt = 0
        try:
            with open(tmp, "wb") as fh:
                while True:
                    headers = {}
                    if written:
                        headers = {"Range": f"bytes={written}-", "If-Range": f'"{art.sha256}"'}
                    try:
                        response = client._send("GET", url, headers=headers, stream=True)
                        try:
                            if written and response.status_code != 206:
                                fh.seek(0)
                                fh.truncate()
                                h, written = hashlib.sha256(), 0
                            for chunk in response.iter_bytes(CHUNK):
                                fh.write(chunk)
                                h.update(chunk)
                                written += len(chunk)
                                if on_progress:
                                    on_progress(written, art.size_bytes)
                        finally:
                            response.close()
                        break
                    except httpx.TransportError:
                        if attempt >= client.retries:
                            raise ConnectionFailed(f"download of {art.name} kept failing") from None
                        client._sleep_before_retry(attempt)
                        attempt += 1
                fh.flush()
                os.fsync(fh.fileno())
            actual = h.hexdigest()
            if actual != art.sha256:
                raise IntegrityError(art.name, art.sha256, actual)
            os.replace(tmp, target)
            return target
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def dumps(obj: Any) -> str:
    """JSON text of a pydantic model, Job, or plain data (for ``--json`` output)."""
    if isinstance(obj, Job):
        obj = obj.data
    if isinstance(obj, BaseModel):
        return obj.model_dump_json(indent=2, by_alias=True)
    if isinstance(obj, list):
        return json.dumps([json.loads(dumps(o)) for o in obj], indent=2)
    return json.dumps(obj, indent=2, default=str)
