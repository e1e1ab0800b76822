"""The job handle: ``Job`` waits for a job, reads or follows its events, cancels it, downloads its artifacts."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
from httpx_sse import EventSource
from pydantic import ValidationError

from client.errors import APIError, ChecksumMismatch, JobFailed, JobWasCancelled, WaitTimeout
from client.transport import Reconnect, Transport, json_or_none
from models.schemas import ArtifactOut, EventOut, JobOut

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})

TransferProgress = Callable[[int, int], None]
JobProgress = Callable[["Job"], None]


def job_from_response(transport: Transport, response: httpx.Response) -> JobOut:
    """The job a POST answered with: its body when that is a whole job, else the job at ``Location``."""
    data = json_or_none(response)
    if isinstance(data, dict) and "status" in data and "spec" in data:
        return JobOut.model_validate(data)
    location = response.headers.get("Location")
    job_id = data.get("id") if isinstance(data, dict) else None
    if not location and not job_id:
        raise APIError(response.status_code, "the server did not say which job it is")
    return JobOut.model_validate(transport.get_json(location or f"/v1/jobs/{job_id}"))


def _safe_relpath(name: str) -> Path:
    """A server-supplied artifact name as a relative path that cannot escape the destination."""
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("", ".", "/")]
    if not parts or any(p == ".." for p in parts):
        raise ValueError(f"unsafe artifact name: {name!r}")
    return Path(*parts)


class Job:
    """A job as last seen by the client; attributes come from the server's JobOut."""

    def __init__(self, transport: Transport, data: JobOut) -> None:
        self._transport = transport
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

    @property
    def artifacts(self) -> list[ArtifactOut]:
        """The artifacts the job produced (empty until it has some)."""
        return list(self.data.result.artifacts) if self.data.result else []

    @property
    def report(self) -> dict[str, Any]:
        """The job's report (empty until it has one)."""
        return dict(self.data.result.report) if self.data.result else {}

    def refresh(self) -> Job:
        """Fetch the job's current state from the server."""
        self.data = JobOut.model_validate(self._transport.get_json(f"/v1/jobs/{self.id}"))
        return self

    def raise_for_status(self) -> Job:
        """Raise JobFailed / JobWasCancelled for a failed or cancelled job; return self otherwise."""
        if self.status == "failed":
            err = self.data.error
            raise JobFailed(self, err.code if err else "failed", err.message if err else "", err.step if err else None)
        if self.status == "cancelled":
            raise JobWasCancelled(self)
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
        response = self._transport.send("POST", f"/v1/jobs/{self.id}/cancel", retry=True)
        self.data = job_from_response(self._transport, response)
        return self

    # -- events ----------------------------------------------------------------------------------

    def events(self, follow: bool = False, after: int | None = None) -> Iterator[EventOut]:
        """The job's events in order; with ``follow``, stream them (SSE) until the job is terminal."""
        if follow:
            yield from self._follow(after)
            return
        yield from self._page_events(after)

    def _page_events(self, after: int | None) -> Iterator[EventOut]:
        last = after if after is not None else -1
        for item in self._transport.paginate(f"/v1/jobs/{self.id}/events", {"after": after}):
            ev = EventOut.model_validate(item)
            if ev.id > last:
                last = ev.id
                yield ev

    def _follow(self, after: int | None) -> Iterator[EventOut]:
        """The event stream, reopened with ``Last-Event-ID`` after a drop; the page log fills the tail."""
        last = after if after is not None else -1
        transport = self._transport
        lifetime_ended = False  # the server ended the stream at its lifetime: reopen with a fresh retry budget

        def connection() -> Iterator[EventOut]:
            nonlocal last, lifetime_ended
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last >= 0:
                headers["Last-Event-ID"] = str(last)
            response = transport.send("GET", f"/v1/jobs/{self.id}/events/stream", headers=headers, stream=True,
                                      retry=False, timeout=transport.long_timeout(60.0))
            try:
                for sse in EventSource(response).iter_sse():
                    if sse.event == "reconnect":
                        lifetime_ended = True
                        continue
                    if not sse.data:
                        continue  # the retry hint, or the blank line after a keep-alive comment
                    try:
                        ev = EventOut.model_validate_json(sse.data)
                    except ValidationError:
                        continue  # a control event
                    if ev.id > last:
                        last = ev.id
                        yield ev
            finally:
                response.close()
            # The stream ends once the job is terminal and everything was sent; anything else was a drop.
            if not lifetime_ended and not self.refresh().done:
                raise Reconnect(f"the event stream of job {self.id} ended early")

        while True:
            lifetime_ended = False
            yield from transport.policy.iterate(connection, f"event stream of job {self.id} keeps dropping")
            if not lifetime_ended or self.refresh().done:
                break
        yield from self._page_events(last if last >= 0 else None)

    # -- artifacts -------------------------------------------------------------------------------

    def download(self, dest_dir: str | Path, on_progress: TransferProgress | None = None) -> list[Path]:
        """Download every artifact into ``dest_dir``, verifying each sha256; return the paths written.

        A job with no artifacts makes no folder: a failed or cancelled one raises JobFailed / JobWasCancelled
        (its error), one still running returns []."""
        if not self.artifacts:
            self.refresh()
        if not self.artifacts:
            self.raise_for_status()
            return []
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        return [self._download_one(art, dest, on_progress) for art in self.artifacts]

    def _download_one(self, art: ArtifactOut, dest: Path, on_progress: TransferProgress | None) -> Path:
        """One artifact into a temporary file (resumed with ``Range`` after a drop), renamed once it verifies."""
        transport = self._transport
        target = dest / _safe_relpath(art.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        url = art.url or f"/v1/artifacts/{art.id}/content"
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
        h = hashlib.sha256()
        written = 0

        def rest(fh: Any) -> Iterator[int]:
            nonlocal h, written
            headers = {"Range": f"bytes={written}-", "If-Range": f'"{art.sha256}"'} if written else {}
            response = transport.send("GET", url, headers=headers, stream=True, retry=False, follow_redirects=True)
            try:
                if written and response.status_code != 206:  # the server sent the whole file again
                    fh.seek(0)
                    fh.truncate()
                    h, written = hashlib.sha256(), 0
                for chunk in response.iter_bytes():  # as received: a drop loses no buffered bytes
                    fh.write(chunk)
                    h.update(chunk)
                    written += len(chunk)
                    if on_progress:
                        on_progress(written, art.size_bytes)
                    yield written
            finally:
                response.close()

        try:
            with open(tmp, "wb") as fh:
                for _ in transport.policy.iterate(lambda: rest(fh), f"download of {art.name} kept failing"):
                    pass
                fh.flush()
                os.fsync(fh.fileno())
            actual = h.hexdigest()
            if actual != art.sha256:
                raise ChecksumMismatch(art.name, art.sha256, actual)
            os.replace(tmp, target)
            return target
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
