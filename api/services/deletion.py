"""DELETE of models, datasets, jobs and artifacts: owner-checked, rows first in one transaction, then blobs.

A blob goes only when no record of any owner refers to it (``models.blobs.sweep_key``). A model or
dataset that an unfinished job uses (or, for a model, any job: the job row refers to it) is a 409
naming the jobs. A queued job is cancelled and deleted at once; a running one is asked to cancel and
marked for deletion (202): the worker's gc deletes it once it is terminal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.errors import ProblemError
from api.services import jobs as job_service
from api.services.lookup import get_owned
from models import blobs
from models.purge import Purged, purge_artifacts, purge_jobs, purge_upload
from models.tables import ACTIVE_STATUSES, TERMINAL, Artifact, Dataset, Job, Model
from storage import get_store

log = logging.getLogger("modelpress.api.deletion")
NAMED_JOBS = 5


@dataclass
class JobDeletion:
    """The outcome of DELETE /v1/jobs/{id}: deleted now, or (``job`` set) deleted once the cancel ends it."""

    job: Job | None


def sweep(keys: set[str]) -> blobs.Swept:
    """Sweep the blobs of just-deleted records (after their transaction committed); failures wait for gc."""
    store = get_store()
    total = blobs.Swept()
    for key in sorted(keys):
        try:
            total.add(blobs.sweep_key(store, key))
        except Exception:  # the key stays in blob_orphans: gc sweeps it later
            log.warning("sweep of blob %s failed; gc will retry", key, exc_info=True)
    return total


def _spec_ids(spec: dict[str, Any]) -> set[str]:
    """Every model and dataset id a stored spec names (input, data, distill teacher/student)."""
    ids = {spec.get("model")} | set((spec.get("data") or {}).values())
    for step in spec.get("steps") or []:
        if isinstance(step, dict):
            ids.add(step.get("teacher"))
            student = step.get("student")
            if isinstance(student, dict):
                ids.add(student.get("model"))
    return {i for i in ids if isinstance(i, str)}


def _users(session: Session, owner: str, ident: str, *, any_status: bool) -> list[str]:
    """Ids of the owner's jobs that use model/dataset ``ident`` (unfinished ones only unless ``any_status``)."""
    query = select(Job.id, Job.spec, Job.model_id, Job.status).where(Job.owner == owner)
    if not any_status:
        query = query.where(Job.status.in_(ACTIVE_STATUSES))
    return sorted(
        jid for jid, spec, model_id, status in session.execute(query)
        if model_id == ident or ident in _spec_ids(spec or {})
    )


def _in_use(kind: str, ident: str, users: list[str], why: str) -> ProblemError:
    named = ", ".join(users[:NAMED_JOBS]) + (f" and {len(users) - NAMED_JOBS} more" if len(users) > NAMED_JOBS else "")
    return ProblemError(409, f"{kind}_in_use", f"{kind} {ident} is used by {why} {named}; delete those jobs first")


def delete_model(session: Session, owner: str, model_id: str) -> Purged:
    """Delete the owner's model if no job refers to it (a job's row keeps its input model); 409 names the jobs."""
    row = get_owned(session, Model, owner, model_id)
    users = _users(session, owner, model_id, any_status=True)
    if users:
        raise _in_use("model", model_id, users, "job(s)")
    out = purge_upload(session, row)
    session.commit()
    sweep(out.keys)
    return out


def delete_dataset(session: Session, owner: str, dataset_id: str) -> Purged:
    """Delete the owner's dataset unless an unfinished job uses it (finished jobs keep only its id)."""
    row = get_owned(session, Dataset, owner, dataset_id)
    users = _users(session, owner, dataset_id, any_status=False)
    if users:
        raise _in_use("dataset", dataset_id, users, "unfinished job(s)")
    out = purge_upload(session, row)
    session.commit()
    sweep(out.keys)
    return out


def delete_artifact(session: Session, owner: str, artifact_id: str) -> Purged:
    """Delete one artifact of the owner's (its job stays; the blob goes when nothing else refers to it)."""
    row = get_owned(session, Artifact, owner, artifact_id)
    out = purge_artifacts(session, [row.id])
    session.commit()
    sweep(out.keys)
    return out


def delete_job(session: Session, owner: str, job_id: str) -> JobDeletion:
    """Delete a terminal job with its events and artifacts; cancel an unfinished one first (see module doc)."""
    job = get_owned(session, Job, owner, job_id)
    if job.status not in TERMINAL:
        try:
            job = job_service.cancel_job(session, owner, job_id)
        except ProblemError as exc:
            if exc.code != "job_terminal":  # it finished meanwhile: delete it below
                raise
            job = get_owned(session, Job, owner, job_id, fresh=True)
    if job.status not in TERMINAL:
        session.execute(update(Job).where(Job.id == job_id).values(delete_requested=True)
                        .execution_options(synchronize_session=False))
        session.commit()
        job_service.READ_CACHE.drop(job_id)  # not cached again: the worker's gc deletes it once it stopped
        return JobDeletion(get_owned(session, Job, owner, job_id, fresh=True))
    out = purge_jobs(session, [job_id])
    session.commit()
    job_service.READ_CACHE.drop(job_id)
    sweep(out.keys)
    return JobDeletion(None)
