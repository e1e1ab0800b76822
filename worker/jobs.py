"""Run one job: claim it atomically, run the pipeline with a DB-backed context, record the outcome.

The Celery task is a thin shell around :func:`execute`. Everything here keeps DB sessions short:
no session is held open while a step runs.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from models.db import session_scope
from models.report import Report
from models.settings import get_settings
from models.spec import JobSpec
from models.tables import (
    CANCELLED,
    FAILED,
    SUCCEEDED,
    TERMINAL,
    Job,
)
from storage import StorageUnavailable
from storage.base import is_full
from worker import adapter_jobs, baselines, children
from worker.records import (
    Claim,
    Heartbeat,
    claim,
    dataset_refs,
    finish,
    job_status,
    model_refs,
    spec_and_owner,
    store_artifacts,
)

if TYPE_CHECKING:
    from worker.context import DBContext, LocalContext
    from worker.stages import PipelineResult

log = logging.getLogger(__name__)


def _make_context(claim: Claim, spec: JobSpec, workdir: Path) -> DBContext:
    from worker.context import DBContext

    # A remote store's inputs are linked into the attempt's folder (removed with it); the local store's are its own files.
    inputs = workdir / "inputs"
    return DBContext(claim, workdir, spec, models=model_refs(spec, inputs), datasets=dataset_refs(spec, inputs))


def _record_success(
    claim: Claim, owner: str, out: PipelineResult, spec: JobSpec, workdir: Path, ctx: LocalContext | None = None
) -> None:
    import json

    from worker import deliverables

    report_path = workdir / "report.json"
    report_path.write_text(json.dumps(out.report, indent=2, default=str))
    files = deliverables.prepare(
        out.output_path, spec, job_id=claim.job_id, workdir=workdir,
        model_ref=ctx.models.get(spec.model) if ctx is not None else None,
        classes=ctx.classes() if ctx is not None else None,
    )
    files["report.json"] = ("report", report_path)
    # the output's own data files travel inside model.zip (deliverables.prepare) when there is one
    files.update({name: ("extra", path) for name, path in out.files.items()
                  if not (name == "model.onnx.data" and "model.zip" in files)})
    artifact_ids = store_artifacts(claim, owner, files)
    report = Report.read(out.report)
    result = {"artifact_ids": artifact_ids, "report": out.report, "warnings": report.warnings}
    if report.budget is not None and report.budget.met is False:
        from models.report_view import accuracy_drop_text

        budget = report.budget
        change = accuracy_drop_text(budget.accuracy_drop, spec.evaluate.max_accuracy_drop,
                                    report.output.num_samples if report.output is not None else None)
        what = budget.reason if budget.is_lm and budget.reason else f"accuracy {change}"
        error = {"code": "accuracy_budget_exceeded", "step": "evaluate",
                 "message": f"{what}; the model is still downloadable"}
        finish(claim, FAILED, error=error, result=result, message="failed: accuracy budget exceeded")
    else:
        finish(claim, SUCCEEDED, result=result, message="succeeded")


def _me() -> str:
    return f"{socket.gethostname()}:{threading.get_native_id()}"


def execute(job_id: str) -> str | None:
    """Claim and run ``job_id``; returns the terminal status this worker set (None if it did not run it)."""
    won = claim(job_id, _me())
    if won is None:
        log.info("job %s not claimed (taken, finished or cancelled)", job_id)
        _notify_parent(job_id)  # a trial cancelled while queued still advances its search
        return None
    spec, owner = spec_and_owner(job_id)
    if spec.search is not None:
        from worker.search import start

        return start(won, spec, owner)
    try:
        return _execute_claimed(won, spec, owner)
    finally:
        _notify_parent(job_id)


def run_queued_here(job_id: str) -> None:
    """Run ``job_id`` on this worker if it is still queued (a multi-task job's baseline or task adapter nobody took);
    else nothing."""
    won = claim(job_id, _me(), reclaim=False)
    if won is not None:
        spec, owner = spec_and_owner(job_id)
        _execute_claimed(won, spec, owner)


def _notify_parent(job_id: str) -> None:
    """A search's trial that ended queues the search's ``advance`` (which is idempotent); a multi-task job's
    baselines have a parent that waits for them itself."""
    with session_scope() as s:
        row = s.execute(select(Job.parent_id, Job.status).where(Job.id == job_id)).one_or_none()
        parent = None if row is None or row.parent_id is None else s.get(Job, row.parent_id)
        searching = parent is not None and (parent.spec or {}).get("search") is not None
        target = None if parent is None or not searching or row is None or row.status not in TERMINAL \
            else (parent.id, parent.queue)
    if target is not None:
        from worker.celery_app import enqueue_advance

        try:
            enqueue_advance(*target)
        except Exception:
            log.exception("advance of search %s not queued after trial %s", target[0], job_id)


def _execute_claimed(won: Claim, spec: JobSpec, owner: str) -> str | None:
    """Run a claimed (non-search) job to its end; the terminal status."""
    from worker.core import JobCancelled
    from worker.pipeline import run
    from worker.stages import StepError

    settings = get_settings()
    job_id = won.job_id
    workdir = settings.home / "work" / job_id / f"attempt-{won.attempt}"
    workdir.mkdir(parents=True, exist_ok=True)
    beat = Heartbeat(won, max(1.0, settings.job_lease_seconds / 4))
    beat.start()
    phase = "setup"  # which part touched the blob store when it failed: fetching inputs or storing outputs
    try:
        from worker.stage_cache.prefix import StageCache
        from worker.stage_cache.reuse import reuse_finished

        status: str = SUCCEEDED
        if not (spec.cache and reuse_finished(won, owner, spec, workdir)):
            ctx = _make_context(won, spec, workdir)
            phase = "pipeline"
            wanted = baselines.start(won, owner, spec)  # they run on other workers beside this one's pipeline
            ctx.task_adapters = adapter_jobs.start(won, owner, spec, run_queued_here)  # the merge step waits for them
            cache = StageCache.for_job(owner, job_id, spec, ctx.device) if spec.cache else None
            out = run(spec, ctx, cache)
            if wanted.items:
                ctx.progress("waiting for the single-task baselines", fraction=1.0)
                baselines.collect(won, wanted, run_queued_here, ctx.check_cancelled)
                baselines.annotate(out.report, wanted)
            phase = "store"
            _record_success(won, owner, out, spec, workdir, ctx)
            if cache is not None:
                cache.remember()
    except JobCancelled:
        finish(won, CANCELLED, message="cancelled")
        status = CANCELLED
    except StepError as e:
        finish(won, FAILED, error={"code": e.code, "message": e.message, "step": e.step},
                message=f"failed in {e.step}: {e.message}")
        status = FAILED
    except Exception as e:
        from celery.exceptions import SoftTimeLimitExceeded

        if isinstance(e, SoftTimeLimitExceeded):
            error = {"code": "time_limit", "step": None,
                     "message": f"the job ran past the soft time limit of {settings.task_soft_time_limit} s"}
        elif is_full(e):
            # No space for the inputs, the work files or the outputs: no artifact of this attempt was recorded.
            log.error("job %s: no space left (%s): %s", job_id, phase, e)
            error = {"code": "storage_full", "step": phase, "message": str(e)}
        elif isinstance(e, StorageUnavailable):
            # Reading inputs or storing outputs failed after the store's own retries: say so, not "internal".
            log.warning("job %s: blob store unavailable: %s", job_id, e)
            error = {"code": "storage_unavailable", "step": phase, "message": str(e)}
        else:
            log.exception("job %s failed outside a step", job_id)
            error = {"code": "internal_error", "step": "store" if phase == "store" else "setup",
                     "message": f"{type(e).__name__}: {e}"}
        finish(won, FAILED, error=error, message=f"failed: {error['message']}")
        status = FAILED
    finally:
        beat.stopped.set()
        if any(getattr(step, "baselines", None) for step in spec.steps) or adapter_jobs.merge_steps(spec):
            children.cancel(job_id)  # those still queued or running once the job ended (cancelled, failed)
        shutil.rmtree(workdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            workdir.parent.rmdir()  # the job's folder, once no other attempt's workdir is in it
    final = job_status(job_id)
    return final if final in TERMINAL else status


