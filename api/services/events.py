"""Job events: pages in id order, and a Server-Sent Events stream that resumes after Last-Event-ID.

The stream polls the database with short sessions. Each poll reads the job's status *before* its new
events, so when a poll sees a terminal status and no new events, every event written before the job
became terminal has been sent, and the stream ends. Every writer of a job's events holds the job's row
lock while it inserts (it updates the row, or locks it first: ``worker.jobs.add_event``), so a job's
event ids commit in order and resuming "after id N" never skips an event committed late.

A stream lives at most ``MODELPRESS_STREAM_MAX_S`` seconds, then ends with a ``reconnect`` control
message (clients resume with ``Last-Event-ID``), and one API process keeps at most
``MODELPRESS_STREAM_MAX_PER_OWNER`` streams open per owner (429 past it). A stream opened with a
per-owner key (or a page session signed in with one) checks at each poll that the key is still active,
and ends with an ``event: revoked`` control message once it was revoked (in any API process).
"""

from __future__ import annotations

import collections
import json
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import ProblemError, field_error
from api.services.numbers import INT64_MAX, parse_int64
from api.services.pagination import paginate
from models.db import session_scope
from models.schemas import EventOut, Page
from models.settings import get_settings
from models.tables import TERMINAL, ApiKey, Job, JobEvent

# Module-level so tests (and operators) can tune them.
POLL_SECONDS = 0.3
KEEPALIVE_SECONDS = 10.0
BATCH = 200
RETRY_MS = 2000
MAX_PAGE = 1000  # event pages may be larger than resource pages


def parse_cursor(value: str | None, field: str) -> int:
    """An event id cursor (``after`` or ``Last-Event-ID``); 0 when absent; 422 naming the field if bad."""
    if value is None or value.strip() == "":
        return 0
    parsed = parse_int64(value.strip())
    if parsed is None:
        raise field_error(422, "validation_error", field, f"must be a non-negative integer event id (at most {INT64_MAX})")
    return parsed


def list_events(session: Session, job_id: str, after: int, limit: int) -> Page[EventOut]:
    """Events of a job after ``after``, oldest first, up to 1000 a page; cursor = the last id when more remain."""
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    rows, cursor = paginate(session, query, JobEvent.id, after, limit, newest_first=False, max_limit=MAX_PAGE)
    return Page[EventOut](
        data=[EventOut.model_validate(r) for r in rows], next_cursor=None if cursor is None else str(cursor)
    )


@dataclass
class _Poll:
    status: str | None
    events: list[EventOut]
    revoked: bool = False


def _poll(job_id: str, after: int, key_id: str | None = None) -> _Poll:
    with session_scope() as session:
        if key_id is not None:
            row = session.execute(select(ApiKey.revoked_at).where(ApiKey.id == key_id)).first()
            if row is None or row.revoked_at is not None:
                return _Poll(None, [], revoked=True)
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        rows = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(BATCH)
        )
        return _Poll(status, [EventOut.model_validate(r) for r in rows])


def format_event(event: EventOut) -> str:
    """One SSE message: ``id``, ``event`` (the kind) and ``data`` (the EventOut JSON, one line)."""
    return f"id: {event.id}\nevent: {event.kind}\ndata: {event.model_dump_json()}\n\n"


class StreamSlots:
    """Open event streams per owner in this API process, capped: past the cap a new stream is a 429.

    A slot is taken by the route before the response starts and given back when the stream's generator
    ends, is cancelled by a disconnect, or is garbage collected without ever starting."""

    def __init__(self) -> None:
        self._open: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def open_count(self, owner: str) -> int:
        with self._lock:
            return self._open[owner]

    def take(self, owner: str, cap: int) -> Callable[[], None]:
        """A release function for a new slot of ``owner``'s; 429 problem when ``cap`` are open already."""
        with self._lock:
            if self._open[owner] >= cap:
                raise ProblemError(
                    429, "too_many_streams",
                    f"{cap} event streams are open for this key already (MODELPRESS_STREAM_MAX_PER_OWNER); "
                    "close one, or poll GET /v1/jobs/{id}/events",
                    headers={"Retry-After": "5"},
                )
            self._open[owner] += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._open[owner] -= 1
                    if self._open[owner] <= 0:
                        del self._open[owner]

        return release


SLOTS = StreamSlots()


def open_stream(owner: str, job_id: str, after: int, key_id: str | None = None) -> AsyncIterator[str]:
    """The SSE body of a job's events for ``owner``, holding one of the owner's stream slots while it lives;
    ``key_id``: the per-owner key it was opened with (the stream ends when that key is revoked)."""
    settings = get_settings()
    release = SLOTS.take(owner, settings.stream_max_per_owner)
    body = stream_events(job_id, after, max_s=settings.stream_max_s, on_close=release, key_id=key_id)
    weakref.finalize(body, release)  # a body that never started still gives its slot back
    return body


def end_of_lifetime(max_s: float) -> str:
    """The control message that ends a stream at its lifetime (no ``id``: the client resumes from its last event)."""
    data = json.dumps({"reason": "lifetime", "max_s": max_s, "resume": "reconnect with Last-Event-ID"})
    return f"event: reconnect\ndata: {data}\n\n"


def revoked_message() -> str:
    """The control message that ends a stream whose key was revoked (no ``id``; reconnecting is a 401)."""
    return f"event: revoked\ndata: {json.dumps({'reason': 'key_revoked'})}\n\n"


async def stream_events(
    job_id: str, after: int, max_s: float | None = None, on_close: Callable[[], None] | None = None,
    key_id: str | None = None,
) -> AsyncIterator[str]:
    """SSE text for a job's events after ``after``, until the job is terminal and everything was sent,
    or, after ``max_s`` seconds, a ``reconnect`` control message (the client resumes with Last-Event-ID),
    or a ``revoked`` one once the key ``key_id`` was revoked."""
    try:
        async for text in _events_text(job_id, after, max_s, key_id):
            yield text
    finally:
        if on_close is not None:
            on_close()


async def _events_text(job_id: str, after: int, max_s: float | None, key_id: str | None) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    last = after
    last_write = time.monotonic()
    deadline = None if max_s is None else last_write + max_s
    while True:
        if deadline is not None and time.monotonic() >= deadline:
            yield end_of_lifetime(max_s or 0.0)
            return
        poll = await anyio.to_thread.run_sync(_poll, job_id, last, key_id)
        if poll.revoked:
            yield revoked_message()
            return
        for event in poll.events:
            yield format_event(event)
            last = event.id
        if poll.events:
            last_write = time.monotonic()
            if len(poll.events) == BATCH:
                continue
        if poll.status is None or (poll.status in TERMINAL and not poll.events):
            return
        if poll.status in TERMINAL:
            continue  # one more poll to be sure nothing arrived after this batch
        if time.monotonic() - last_write >= KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last_write = time.monotonic()
        await anyio.sleep(POLL_SECONDS)
