"""Job events: pages in id order, and a Server-Sent Events stream that resumes after Last-Event-ID.

The stream polls the database with short sessions. Each poll reads the job's status *before* its new
events, so when a poll sees a terminal status and no new events, every event written before the job
became terminal has been sent, and the stream ends. Every writer of a job's events holds the job's row
lock while it inserts (it updates the row, or locks it first: ``worker.jobs.add_event``), so a job's
event ids commit in order and resuming "after id N" never skips an event committed late.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import field_error
from api.services.numbers import INT64_MAX, parse_int64
from api.services.pagination import paginate
from models.db import session_scope
from models.schemas import EventOut, Page
from models.tables import TERMINAL, Job, JobEvent

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


def _poll(job_id: str, after: int) -> _Poll:
    with session_scope() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        rows = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(BATCH)
        )
        return _Poll(status, [EventOut.model_validate(r) for r in rows])


def format_event(event: EventOut) -> str:
    """One SSE message: ``id``, ``event`` (the kind) and ``data`` (the EventOut JSON, one line)."""
    return f"id: {event.id}\nevent: {event.kind}\ndata: {event.model_dump_json()}\n\n"


async def stream_events(job_id: str, after: int) -> AsyncIterator[str]:
    """SSE text for a job's events after ``after``, until the job is terminal and everything was sent."""
    yield f"retry: {RETRY_MS}\n\n"
    last = after
    last_write = time.monotonic()
    while True:
        poll = await anyio.to_thread.run_sync(_poll, job_id, last)
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
