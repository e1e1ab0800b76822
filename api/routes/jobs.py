"""Jobs: submit, read, list, cancel, and their events (pages and a Server-Sent Events stream)."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import DB, Owner, SubmitOwner, current_principal, settings_dep
from api.services import admission, deletion
from api.services import events as event_service
from api.services import jobs as job_service
from api.services.keys import Principal
from api.services.pagination import DEFAULT_LIMIT
from models.db import session_scope
from models.schemas import EventOut, JobCreate, JobOut, Page
from models.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", response_model=JobOut, status_code=202)
async def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    owner: SubmitOwner,
    settings: Annotated[Settings, Depends(settings_dep)],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JobOut:
    """Validate and queue a job (202 + Location); a repeated Idempotency-Key returns the first job (200).

    The body is a job spec plus an optional ``name`` and ``metadata`` (string key/values) for the job.
    A busy server answers 503 ``overloaded`` with Retry-After before anything is recorded."""
    spec, labels = body.split()
    async with admission.turn(request.app.state, settings):
        out, created = await anyio.to_thread.run_sync(
            job_service.submit, owner, spec, idempotency_key, settings, labels)
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/jobs/{out.id}"
    return out


@router.get("", response_model=Page[JobOut])
def list_jobs(
    owner: Owner,
    db: DB,
    status: str | None = None,
    after: str | None = None,
    limit: int = DEFAULT_LIMIT,
    name: str | None = None,
    meta: Annotated[list[str] | None, Query(description="key=value, repeatable; all must match")] = None,
    parent: str | None = None,
) -> Page[JobOut]:
    """The owner's jobs, newest first, optionally filtered by status, name, metadata (``meta=k=v``) or
    search (``parent``: its trials)."""
    wanted = job_service.parse_meta_filters(meta)
    return job_service.list_jobs(db, owner, status, after, limit, name, wanted, parent)


@router.get("/{job_id}", response_model=JobOut, response_class=Response)
async def get_job(job_id: str, owner: Owner, settings: Annotated[Settings, Depends(settings_dep)]) -> Response:
    """One job: status, phase, progress, error, result and timestamps (clients poll this: kept cheap)."""
    body = job_service.READ_CACHE.get(owner, job_id) if settings.job_read_cache_s > 0 else None
    if body is None:  # only a cache miss costs a thread hop and a query
        body = await anyio.to_thread.run_sync(
            job_service.read_job_json, owner, job_id, settings.job_read_cache_s
        )
    return Response(body, media_type="application/json")


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, owner: Owner, db: DB) -> JobOut:
    """Cancel a queued job now, or ask a running one to stop; 409 when it already finished."""
    return job_service.job_out(db, job_service.cancel_job(db, owner, job_id))


@router.delete(
    "/{job_id}", status_code=204, response_class=Response,
    responses={202: {"model": JobOut, "description": "cancel requested; deleted once the job has stopped"}},
)
def delete_job(job_id: str, owner: Owner, db: DB) -> Response:
    """Delete a finished job with its events and artifacts (204); a queued job is cancelled and deleted
    (204); a running one is asked to cancel and deleted once it has stopped (202 with the job)."""
    out = deletion.delete_job(db, owner, job_id)
    if out.job is None:
        return Response(status_code=204)
    body = job_service.job_out(db, out.job)
    return JSONResponse(body.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


@router.get("/{job_id}/events", response_model=Page[EventOut])
def list_events(
    job_id: str, owner: Owner, db: DB, after: str | None = None, limit: int = 100
) -> Page[EventOut]:
    """The job's events after the ``after`` event id, oldest first."""
    job_service.get_job(db, owner, job_id)
    return event_service.list_events(db, job_id, event_service.parse_cursor(after, "after"), limit)


def _check_job(owner: str, job_id: str) -> None:
    with session_scope() as session:
        job_service.get_job(session, owner, job_id)


@router.get("/{job_id}/events/stream", response_class=StreamingResponse)
async def stream_events(
    job_id: str,
    principal: Annotated[Principal, Depends(current_principal)],
    after: str | None = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    """Server-Sent Events of the job, resuming after ``Last-Event-ID`` (or ``after``); ends when it is done,
    or after MODELPRESS_STREAM_MAX_S with a ``reconnect`` event, or with a ``revoked`` event once its key was
    revoked; 429 past the owner's open-stream cap."""
    owner = principal.owner
    await anyio.to_thread.run_sync(_check_job, owner, job_id)
    if last_event_id is not None and last_event_id.strip():
        start = event_service.parse_cursor(last_event_id, "Last-Event-ID")
    else:
        start = event_service.parse_cursor(after, "after")
    return StreamingResponse(
        event_service.open_stream(owner, job_id, start, principal.key_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
