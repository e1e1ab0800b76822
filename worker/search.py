"""The auto-optimize search (docs/architecture.md §10): trials fanned out as child jobs over the worker fleet.

Event-driven, so the search never holds a worker slot while its trials run (a one-process worker would
deadlock): :func:`start` plans the trials and starts the first ones; each trial's worker, when the trial
ends, queues :func:`advance`, which under the search's row lock records the outcome, adds the recipes a
quality miss escalates to, skips trials that cannot win, starts the next ones (at most ``parallelism`` at
once, at most ``max_trials`` in all) and, when none is left, runs :func:`finalize` on this one worker:
the finalists' and the input's latency re-measured interleaved with one harness (the KV-cache harness of
``worker.lm`` for causal LMs), the winner picked only if it beats the input by more than the measured
noise, its model and report made the search's own artifacts.

Every phase (plan, advance, finalize, adopt) ends the search when it raises: ``failed`` with
``error.step`` ``search.<phase>``, every trial kept and the unfinished ones cancelled. A cancel ends the
search in any phase: finalize checks it between its rounds.

The plan lives in the search's ``progress.metrics.search`` (trials, their states and outcomes), so the
progress a client reads shows trials done / running / skipped and the best so far.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from models.db import retry_transient, session_scope
from models.ids import new_id
from models.objectives import OBJECTIVES, SIZE_TIE, paired_ratio
from models.queues import queued_message
from models.report import Evaluation, Report
from models.search_space import (
    CPU,
    FP16,
    Candidate,
    Outcome,
    auto_space,
    barred_winner,
    beats_input,
    candidates,
    conv_heavy,
    escalations,
    estimate,
    fp16_dropped,
    meets,
    noise_margin,
    pareto,
    prefix_shortfall,
    shortfall,
    skip_reason,
)
from models.settings import get_settings
from models.spec import JobSpec, QuantizeStep, trial_spec
from models.tables import (
    CANCELLED,
    CANCELLING,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    Artifact,
    Job,
    JobEvent,
    Model,
    utcnow,
)
from storage import get_store
from worker.ort_guard import RunGuard
from worker.records import Claim, Heartbeat, dataset_refs, finish, reuse_artifacts, store_artifacts

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worker.core import ArrayDataset

log = logging.getLogger(__name__)

PENDING, SKIPPED = "pending", "skipped"
ACTIVE_TRIAL = (QUEUED, RUNNING, CANCELLING)
MAX_FINALISTS = 8
LATENCY_ROUNDS = 7
BASELINE_LABEL = "input (exported, no steps)"
# The plan's probe of fp16 on the CPU provider: a quick conversion timed against the input in this many
# interleaved rounds of this many runs in all; uploads larger than FP16_PROBE_MAX_BYTES are not probed.
FP16_PROBE_ROUNDS, FP16_PROBE_RUNS, FP16_PROBE_MAX_BYTES = 3, 24, 1_000_000_000
# The re-measure checks for a cancel at most this often (seconds). A DB query between every timed run left
# each run cold: a 0.11 ms CNN timed 0.37 ms, both sides of a ratio gaining the same ~0.26 ms.
CANCEL_POLL_S = 0.5


class SearchCancelled(Exception):
    """The search was cancelled while this worker finalized it."""


class PhaseFailed(Exception):
    """An exception in one phase of the search (plan, advance, finalize, adopt)."""

    def __init__(self, phase: str, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.phase = phase


@contextlib.contextmanager
def _phase(name: str) -> Iterator[None]:
    """Name the phase any exception inside comes from (a cancel passes through)."""
    try:
        yield
    except (SearchCancelled, PhaseFailed):
        raise
    except Exception as exc:
        raise PhaseFailed(name, exc) from exc


def _candidate(t: dict[str, Any]) -> Candidate:
    e = t["estimate"]
    return Candidate(t["steps"], e["cost"], e["size_ratio"], e["latency_ratio"], e["risk"], t["label"],
                     size_floor=e.get("size_floor", 0.0), latency_floor=e.get("latency_floor", 0.0))


def _row(index: int, c: Candidate, **extra: Any) -> dict[str, Any]:
    """A pending row of the trial table."""
    return {"index": index, "label": c.label, "steps": c.steps, "state": PENDING, "job_id": None,
            "estimate": {"cost": c.cost, "size_ratio": c.size_ratio, "latency_ratio": c.latency_ratio,
                         "risk": c.risk, "size_floor": c.size_floor, "latency_floor": c.latency_floor},
            **extra}


def _has_data(spec: JobSpec) -> bool:
    """Whether rows can calibrate: the job's data, or the train rows of a multi-task step its trials run first."""
    prefix = spec.search.prefix if spec.search is not None else []
    return bool(spec.data.calibration or spec.data.train or spec.data.eval
                or any(getattr(step, "tasks", None) for step in prefix))


def plan(spec: JobSpec, model_format: str, model_meta: dict[str, Any],
         fp16_measured: tuple[float, float] | str | None = None) -> list[dict[str, Any]]:
    """The trial table of a search: its candidates cheapest first (``max_trials`` of them start, see
    :func:`advance`); an upload that is no ONNX file gets a baseline row first (the input exported with
    no steps), so the input is re-measured beside the finalists. An ``auto`` space leaves fp16 out where
    ``fp16_dropped`` says (``fp16_measured``: the plan's probe, :func:`probe_fp16`), as a skipped row
    naming why."""
    search = spec.search
    assert search is not None
    dropped: str | None = None
    if search.space == "auto":
        provider = spec.evaluate.latency.provider
        if spec.task != "text-generation":  # an LM's space has no fp16 anywhere
            dropped = fp16_dropped(provider, fp16_measured)
        # an LM's GPTQ calibrates on calibration or train text only, never on the eval set its perplexity is
        # read on (the weight-only pass's own_calibration_text); other tasks may carve calibration rows from eval
        calibration = (bool(spec.data.calibration or spec.data.train) if spec.task == "text-generation"
                       else _has_data(spec))
        # after a prefix (a multi-task finetune: one head per task), the post-training recipes only: pruning
        # with recovery distillation from the single-head input does not apply to it
        space = auto_space(spec.task, model_format, model_meta, train=spec.data.train is not None and not search.prefix,
                           calibration=calibration, provider=provider, fp16=dropped is None,
                           objective=search.objective)
    else:
        space = [[s.model_dump(mode="json") for s in steps]
                 for steps in search.space]
    table: list[dict[str, Any]] = []
    if model_format != "onnx":
        base = estimate([])
        table.append(_row(0, Candidate([], base.cost, 1.0, 1.0, 0.0, BASELINE_LABEL, 1.0, 1.0), baseline=True))
    for c in candidates(space):
        table.append(_row(len(table), c))
    if dropped:
        table.append(_row(len(table), estimate([FP16]), state=SKIPPED, reason=f"not planned: fp16 {dropped}"))
    return table


def probe_fp16(job_id: str, spec: JobSpec, model: Model) -> tuple[float, float] | str | None:
    """Whether the CPU provider runs this upload faster in float16, for an ``auto`` space: a quick fp16
    conversion timed against the input, interleaved (``FP16_PROBE_ROUNDS`` rounds, batch and threads as
    the trials measure): the paired ``(median, worst)`` latency ratio; a string saying why it was not
    measured; None where no probe is needed (an explicit space, a causal LM, another provider)."""
    from worker.evaluate import available_cores
    from worker.passes.quantizers.ort import to_fp16

    lat = spec.evaluate.latency
    if spec.search is None or spec.search.space != "auto" or spec.task == "text-generation" or lat.provider != CPU:
        return None
    if model.format != "onnx":
        return "the upload is no ONNX file"
    if model.size_bytes > FP16_PROBE_MAX_BYTES:
        return f"the upload is over {FP16_PROBE_MAX_BYTES / 1e9:g} GB"
    workdir = get_settings().home / "work" / job_id / "plan"
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        src = get_store().local_copy(model.storage_key, workdir / "input")
        half = to_fp16(src, workdir / "fp16.onnx", QuantizeStep(type="quantize", mode="fp16"))
        timed = remeasure({"input": src, "fp16": half}, max(1, min(lat.threads, available_cores())),
                          lat.batch_size, 2, FP16_PROBE_RUNS, FP16_PROBE_ROUNDS, provider=lat.provider,
                          check_cancelled=lambda: _check_cancel(job_id))
        return paired_ratio(timed["fp16"]["round_medians"], timed["input"]["round_medians"])
    except SearchCancelled:
        return "the search was cancelled"
    except Exception as exc:  # the probe is advice: a graph the converter or the session refuses is not probed
        log.warning("search %s: fp16 probe failed: %s", job_id, exc)
        return f"the probe failed: {type(exc).__name__}: {str(exc)[:160]}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def start(claim: Claim, spec: JobSpec, owner: str) -> str:
    """The search's own task: plan the trials (once) and start the first ones; the search stays running."""
    try:
        with _phase("plan"):
            _plan_once(claim, spec)
    except Exception as exc:
        return _end_failed(claim.job_id, exc) or FAILED
    return advance(claim.job_id) or RUNNING


def _plan_once(claim: Claim, spec: JobSpec) -> None:
    with session_scope() as s:  # the probe times two models: outside the search's row lock
        job = s.get(Job, claim.job_id)
        if job is None or (job.progress or {}).get("metrics", {}).get("search") is not None:
            return
        model = s.get(Model, spec.model)
        assert model is not None
        s.expunge(model)
    measured = probe_fp16(claim.job_id, spec, model)
    with session_scope() as s:
        job = s.execute(select(Job).where(Job.id == claim.job_id).with_for_update()).scalar_one()
        state = (job.progress or {}).get("metrics", {}).get("search")
        if state is not None:
            return
        table = plan(spec, model.format, dict(model.meta), measured)
        state = {"trials": table, "started": time.time(), "best": None}
        if measured is not None:
            state["fp16_probe"] = ({"ratio": measured[0], "worst_round": measured[1]} if isinstance(measured, tuple)
                                   else {"not_measured": measured})
        job.progress = {"step": 0, "steps": len(table), "percent": 0.0, "metrics": {"search": state}}
        job.phase = "searching"
        s.add(JobEvent(job_id=job.id, kind="log", message=f"search: {len(table)} trials planned"
                       + "".join(f"; trial {t['index']} ({t['label']}) {t['reason']}" for t in table
                                 if t["state"] == SKIPPED),
                       data={"trials": [{"index": t["index"], "label": t["label"]} for t in table]}))


def _outcome(t: dict[str, Any], child: Job, objective: str, constraints: dict[str, Any], task: str) -> None:
    """Record what a finished trial measured into its row of the table."""
    stored = child.result or {}
    report = stored.get("report") or {}
    typed = Report.read(report)
    out, inp = typed.output or Evaluation(), typed.input or Evaluation()
    t["state"] = child.status
    t["worker"] = child.worker
    t["error"] = child.error
    if not report:
        t["met"], t["misses"] = False, [f"failed: {(child.error or {}).get('code', child.status)}"]
        return
    lat_out, lat_in = out.latency_median, inp.latency_median
    ratio = OBJECTIVES[objective].ratio(inp, out)
    misses = meets(constraints, report, task)
    if child.status != SUCCEEDED and not misses:
        misses = [f"failed: {(child.error or {}).get('code', child.status)}"]
    t.update(
        met=not misses, misses=misses, objective_ratio=ratio,
        metric=out.metric_value, metric_name=out.metric.name if out.metric is not None else None,
        size_bytes=out.size_bytes, input_size_bytes=inp.size_bytes,
        latency_ms=lat_out, input_latency_ms=lat_in,
        accuracy_drop=typed.budget.accuracy_drop if typed.budget is not None else None,
    )
    if typed.budget is not None and typed.budget.tasks:  # multi-task: the worst task decided
        t["worst_task"], t["tasks"] = typed.budget.task, typed.budget.tasks


def _outcomes(table: list[dict[str, Any]]) -> list[Outcome]:
    return [Outcome(bool(t.get("met")), t.get("objective_ratio"), t["estimate"]["risk"], t.get("misses") or [],
                    steps=t["steps"])
            for t in table if "met" in t and not t.get("baseline")]


def _best(table: list[dict[str, Any]]) -> dict[str, Any] | None:
    met = [t for t in table if t.get("met") and t.get("objective_ratio") is not None and not t.get("baseline")]
    if not met:
        return None
    b = min(met, key=lambda t: (t["objective_ratio"], -(t.get("metric") or 0.0)))
    return {"index": b["index"], "job_id": b["job_id"], "label": b["label"], "objective_ratio": b["objective_ratio"],
            "metric": b.get("metric")}


def _counts(table: list[dict[str, Any]]) -> dict[str, int]:
    done = sum(t["state"] in TERMINAL for t in table)
    return {"total": len(table), "done": done, "running": sum(t["state"] in ACTIVE_TRIAL for t in table),
            "skipped": sum(t["state"] == SKIPPED for t in table),
            "pending": sum(t["state"] == PENDING for t in table)}


def _steps_key(spec: JobSpec, steps: list[dict[str, Any]]) -> str | None:
    """A trial's steps with every default filled in, as text (None: steps a trial cannot run)."""
    try:
        full = trial_spec(spec, steps).steps
    except ValueError:  # pydantic's ValidationError is a ValueError: a recipe this spec cannot run
        return None
    return json.dumps([s.model_dump(mode="json") for s in full], sort_keys=True)


def _escalate(spec: JobSpec, table: list[dict[str, Any]], missed: dict[str, Any],
              miss: float | None, prefix_miss: float | None = None) -> list[dict[str, Any]]:
    """The recipes a quality miss of ``missed`` (``miss`` times the allowed loss; ``prefix_miss``: the
    same before its last step) calls for, as new pending rows placed before the other pending ones (they
    run next); recipes already in the table are not added."""
    search = spec.search
    assert search is not None
    seen = {_steps_key(spec, t["steps"]) for t in table}
    rows: list[dict[str, Any]] = []
    for steps in escalations(missed["steps"], search.constraints.model_dump(), calibration=_has_data(spec),
                             miss=miss, prefix_miss=prefix_miss):
        key = _steps_key(spec, steps)
        if key is None or key in seen:
            continue
        seen.add(key)
        rows.append(_row(max(t["index"] for t in table) + 1 + len(rows), estimate(steps),
                         escalated_from=missed["index"]))
    first_pending = next((i for i, t in enumerate(table) if t["state"] == PENDING), len(table))
    table[first_pending:first_pending] = rows
    return rows


def _record_ended(s: Session, search_id: str, spec: JobSpec, table: list[dict[str, Any]],
                  children: dict[str, Job]) -> None:
    """Each trial that ended since the last advance: its outcome, and the escalations a quality miss adds."""
    search = spec.search
    assert search is not None
    constraints = search.constraints.model_dump()
    for t in list(table):
        child = children.get(t["job_id"] or "")
        if child is None or t["state"] in TERMINAL:
            continue
        if child.status not in TERMINAL:
            t["state"] = child.status
            continue
        _outcome(t, child, search.objective, constraints, spec.task)
        s.add(JobEvent(job_id=search_id, kind="log", data={"trial": _trial_view(t)},
                       message=f"trial {t['index']} ({t['label']}) {child.status}"
                               + ("" if t.get("met") else f": {'; '.join(t.get('misses') or [])}")))
        misses = t.get("misses") or []
        if t.get("baseline") or not misses or not all(m.startswith("quality") for m in misses):
            continue
        report = (child.result or {}).get("report") or {}
        miss, prefix = shortfall(constraints, report, spec.task), prefix_shortfall(constraints, report)
        t["shortfall"], t["prefix_shortfall"] = miss, prefix
        for row in _escalate(spec, table, t, miss, prefix):
            s.add(JobEvent(job_id=search_id, kind="log", data={"trial": _trial_view(row)},
                           message=f"trial {row['index']} ({row['label']}) added: trial {t['index']} missed "
                                   f"{'; '.join(misses)}"))


def _cancel_trials(s: Session, table: list[dict[str, Any]], children: dict[str, Job]) -> None:
    """Pending trials skipped, queued ones cancelled, running ones asked to stop."""
    for t in table:
        child = children.get(t["job_id"] or "")
        if t["state"] == PENDING:
            t.update(state=SKIPPED, reason="the search was cancelled")
        elif child is not None and child.status == QUEUED:
            s.execute(update(Job).where(Job.id == child.id, Job.status == QUEUED).values(
                status=CANCELLED, phase=CANCELLED, cancel_requested=True, finished_at=utcnow()))
            t["state"] = CANCELLED
        elif child is not None and child.status == RUNNING:
            s.execute(update(Job).where(Job.id == child.id, Job.status == RUNNING).values(
                status=CANCELLING, cancel_requested=True))


def _skip(s: Session, search_id: str, t: dict[str, Any], reason: str) -> None:
    t.update(state=SKIPPED, reason=reason)
    s.add(JobEvent(job_id=search_id, kind="log", message=f"trial {t['index']} ({t['label']}) skipped: {reason}",
                   data={"trial": _trial_view(t)}))


def _start_next(s: Session, job: Job, spec: JobSpec, table: list[dict[str, Any]], started_at: float,
                ) -> list[tuple[str, str]]:
    """Start pending trials up to ``parallelism`` running and ``max_trials`` started (the baseline row is
    not a trial of the budget); skip those that cannot win; once the budget is spent (trials or wall
    time), skip the rest. The ``(job id, queue)`` pairs to enqueue after the commit."""
    search = spec.search
    assert search is not None
    budget = search.budget
    over_time = budget.max_wall_s is not None and time.time() - started_at > budget.max_wall_s
    active = sum(t["state"] in ACTIVE_TRIAL for t in table)
    started = sum(1 for t in table if t.get("job_id") and not t.get("baseline"))
    to_enqueue: list[tuple[str, str]] = []
    for t in table:
        if t["state"] != PENDING:
            continue
        if over_time:
            _skip(s, job.id, t, f"budget: past max_wall_s {budget.max_wall_s:g} s")
            continue
        if not t.get("baseline"):
            if started >= budget.max_trials:
                _skip(s, job.id, t, f"budget: max_trials {budget.max_trials}")
                continue
            reason = skip_reason(_candidate(t), search.objective, _outcomes(table))
            if reason:
                _skip(s, job.id, t, reason)
                continue
        if active >= search.parallelism:
            continue
        child_spec = trial_spec(spec, t["steps"], prefix=not t.get("baseline"))
        child = Job(id=new_id("job"), owner=job.owner, status=QUEUED, phase="queued",
                    progress={"step": 0, "steps": len(child_spec.steps), "percent": 0.0},
                    spec=child_spec.model_dump(mode="json"), model_id=job.model_id,
                    queue=get_settings().queue_for(child_spec), attempt=0, max_attempts=job.max_attempts, parent_id=job.id)
        s.add(child)
        s.add(JobEvent(job_id=child.id, kind="status", message=queued_message(child.queue, get_settings().gpu_queue)
                       + f" (trial {t['index']} of search {job.id})", data={"status": QUEUED}))
        t.update(state=QUEUED, job_id=child.id)
        to_enqueue.append((child.id, child.queue))
        active += 1
        started += 0 if t.get("baseline") else 1
    return to_enqueue


def _take_over_finalize(search_id: str) -> Claim | None:
    """While the search is finalizing, wait for it to end or for its heartbeat (which finalize beats) to go
    stale, i.e. for its worker to have died: then this worker takes finalize over (the claim it runs under).
    A cancelled search whose finalizer died is cancelled here at once (a live finalizer sees the cancel
    between its rounds). None when the search is not finalizing (or ended meanwhile)."""
    lease = get_settings().job_lease_seconds
    deadline = time.monotonic() + lease * 2 + 5
    while time.monotonic() < deadline:
        with session_scope() as s:
            job = s.execute(select(Job).where(Job.id == search_id).with_for_update()).scalar_one_or_none()
            if job is None or job.status not in (RUNNING, CANCELLING):
                return None
            if not ((job.progress or {}).get("metrics", {}).get("search") or {}).get("finalizing"):
                return None
            stale = job.heartbeat_at is None or job.heartbeat_at < utcnow() - timedelta(seconds=lease)
            if job.status == CANCELLING:
                if stale:
                    job.status, job.phase, job.finished_at = CANCELLED, CANCELLED, utcnow()
                    s.add(JobEvent(job_id=search_id, kind="status", data={"status": CANCELLED},
                                   message="cancelled (while finalizing; its finalizer had stopped)"))
                return None
            if stale:
                job.heartbeat_at = utcnow()
                return Claim(search_id, job.attempt)
        time.sleep(min(2.0, lease / 4))
    return None


def advance(search_id: str) -> str | None:
    """Bring the search up to date (idempotent; under its row lock): record ended trials, escalate quality
    misses, skip or start the next ones, cancel them all when the search is cancelling, finalize when none
    is left. An exception in any phase ends the search ``failed`` (see :func:`_end_failed`)."""
    try:
        return _advance(search_id)
    except Exception as exc:
        return _end_failed(search_id, exc)


def _advance(search_id: str) -> str | None:
    taken = _take_over_finalize(search_id)
    if taken is not None:
        log.warning("search %s: finalize taken over (the worker finalizing it stopped beating)", search_id)
        return finalize(taken)
    to_enqueue: list[tuple[str, str]] = []
    finalize_claim: Claim | None = None
    with _phase("advance"), session_scope() as s:
        job = s.execute(select(Job).where(Job.id == search_id).with_for_update()).scalar_one_or_none()
        if job is None or job.status not in (RUNNING, CANCELLING):
            return None if job is None else job.status
        state = json.loads(json.dumps((job.progress or {}).get("metrics", {}).get("search") or {}))
        if not state or state.get("finalizing"):
            return job.status
        spec = JobSpec.model_validate(job.spec)
        table: list[dict[str, Any]] = state["trials"]
        children = {c.id: c for c in s.scalars(select(Job).where(Job.parent_id == search_id))}
        _record_ended(s, search_id, spec, table, children)
        if job.status == CANCELLING:
            _cancel_trials(s, table, children)
        else:
            to_enqueue = _start_next(s, job, spec, table, float(state.get("started", time.time())))
        counts = _counts(table)
        state["best"] = _best(table)
        state.update(counts)
        ended = counts["pending"] == 0 and counts["running"] == 0
        if ended and job.status == CANCELLING:
            job.status, job.phase, job.finished_at = CANCELLED, CANCELLED, utcnow()
            s.add(JobEvent(job_id=search_id, kind="status", message="cancelled (every trial ended)",
                           data={"status": CANCELLED}))
        elif ended:
            state["finalizing"] = True
            finalize_claim = Claim(search_id, job.attempt)
            job.phase = "finalizing"
        total = max(1, counts["total"])
        job.progress = {"step": counts["done"] + counts["skipped"], "steps": counts["total"],
                        "percent": 100.0 * (counts["done"] + counts["skipped"]) / total,
                        "metrics": {"search": state}}
        job.heartbeat_at = utcnow()
        status = job.status
    for child_id, queue in to_enqueue:
        _enqueue_trial(search_id, child_id, queue)
    if finalize_claim is not None:
        return finalize(finalize_claim)
    return status


@retry_transient()
def _end_failed(search_id: str, exc: BaseException) -> str | None:
    """End the search after an exception in one of its phases: ``failed`` with the error and the phase
    (``error.step``: ``search.<phase>``) and the trial table kept in its report; its unfinished trials are
    cancelled. A search being cancelled ends ``cancelled``. The status it ends in (None: no such search)."""
    phase = exc.phase if isinstance(exc, PhaseFailed) else "advance"
    cause = exc.__cause__ if isinstance(exc, PhaseFailed) and exc.__cause__ is not None else exc
    log.error("search %s failed in %s", search_id, phase, exc_info=cause)
    with session_scope() as s:
        job = s.execute(select(Job).where(Job.id == search_id).with_for_update()).scalar_one_or_none()
        if job is None or job.status not in (RUNNING, CANCELLING):
            return None if job is None else job.status
        state = json.loads(json.dumps((job.progress or {}).get("metrics", {}).get("search") or {}))
        table: list[dict[str, Any]] = state.get("trials") or []
        children = {c.id: c for c in s.scalars(select(Job).where(Job.parent_id == search_id))}
        _cancel_trials(s, table, children)
        state.pop("finalizing", None)
        error = {"code": "search_error", "step": f"search.{phase}",
                 "message": f"the search's {phase} phase raised {type(cause).__name__}: {cause}"}
        status = CANCELLED if job.status == CANCELLING else FAILED
        job.status, job.phase, job.finished_at = status, status, utcnow()
        job.error = error if status == FAILED else None
        job.progress = {**(job.progress or {}), "metrics": {"search": state}}
        job.result = {"report": {"search": {"trials": [_trial_view(t) for t in table], **_counts(table),
                                            "failed_phase": phase}}}
        s.add(JobEvent(job_id=search_id, kind="status", data={"status": status, "error": error},
                       message=f"failed in search.{phase}: {error['message']}" if status == FAILED
                       else f"cancelled (the {phase} phase raised {type(cause).__name__})"))
    shutil.rmtree(get_settings().home / "work" / search_id, ignore_errors=True)
    return status


def _enqueue_trial(search_id: str, child_id: str, queue: str) -> None:
    from worker.celery_app import enqueue_job

    try:
        enqueue_job(child_id, queue)
    except Exception as exc:
        log.error("trial %s of %s not queued: %s", child_id, search_id, exc)
        with session_scope() as s:
            s.execute(update(Job).where(Job.id == child_id, Job.status == QUEUED).values(
                status=FAILED, phase="failed", finished_at=utcnow(),
                error={"code": "broker_unavailable", "step": None, "message": f"not queued: {exc}"}))


def _trial_view(t: dict[str, Any]) -> dict[str, Any]:
    keys = ("index", "label", "state", "job_id", "reason", "met", "misses", "metric", "metric_name", "size_bytes",
            "latency_ms", "objective_ratio", "worker", "steps", "baseline", "escalated_from", "beats_input",
            "final_ratio", "margin", "barred", "worst_task", "tasks")
    return {k: t[k] for k in keys if k in t}


def _artifacts(job_id: str) -> dict[str, Artifact]:
    with session_scope() as s:
        rows = list(s.scalars(select(Artifact).where(Artifact.job_id == job_id)))
        s.expunge_all()
    return {a.name: a for a in rows}


def _never() -> None:
    """The default cancel check."""


def _is_lm_file(path: Path) -> bool:
    """Whether an ONNX file takes a KV cache (``past_key_values.*`` inputs): a causal LM of ``worker.lm``."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(i.name.startswith("past_key_values.") for i in graph.input)


def _throttled(check: Callable[[], None], every_s: float) -> Callable[[], None]:
    """``check`` run at its first call and then at most once every ``every_s`` seconds."""
    last = [float("-inf")]

    def maybe() -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            check()

    return maybe


class _Timer:
    """One model in the interleaved harness: ``time(runs)`` is the median ms of ``runs`` timed runs."""

    def __init__(self, path: Path, threads: int, batch_size: int, provider: str, prompt_tokens: int,
                 data: Callable[[Path], ArrayDataset | None] | None, guard: RunGuard) -> None:
        from worker.evaluate import latency_batch, make_session

        self.guard = guard
        self.lm = None
        if _is_lm_file(path):  # the LM evaluation's harness: a prefill over the KV-cache inputs, batch 1
            from worker.lm.session import LMSession

            self.lm = LMSession(path, threads=threads, guard=guard)
            self.prompt_tokens = prompt_tokens
        else:
            self.session = make_session(path, threads, provider)
            self.batch = latency_batch(self.session, data(path) if data else None, batch_size)

    def time(self, warmup: int, runs: int, check_cancelled: Callable[[], None]) -> dict[str, float]:
        from worker.evaluate import measure_latency

        if self.lm is not None:
            return self.lm.time_prefill(self.prompt_tokens, runs, warmup, check_cancelled)
        return dict(measure_latency(self.session, self.batch, warmup, runs, check_cancelled, self.guard)["ms"])


def remeasure(paths: dict[str, Path], threads: int, batch_size: int, warmup: int, runs: int,
              rounds: int = LATENCY_ROUNDS, data: Callable[[Path], ArrayDataset | None] | None = None, *,
              provider: str = "CPUExecutionProvider", prompt_tokens: int = 32,
              check_cancelled: Callable[[], None] = _never) -> dict[str, dict[str, Any]]:
    """Latency of each model, interleaved: ``rounds`` rounds each timing every model for ``runs/rounds``
    runs (the order rotating), one harness and one process, so drift hits all of them alike; on
    ``data(path)``'s samples (the eval set shaped for that model) or synthetic ones. A causal LM (KV-cache
    inputs) is timed as the LM evaluation times it: a ``prompt_tokens`` prefill at batch 1 through
    ``worker.lm.session``. ``{id: {median, min, rounds, round_medians}}`` in ms (the median of the round
    medians); ``check_cancelled`` runs between runs, at most every ``CANCEL_POLL_S`` seconds (the runs stay
    back to back, as a deployment calls them), and, by a watchdog, during each (worker/ort_guard.py: every
    run bounded)."""
    check_cancelled = _throttled(check_cancelled, CANCEL_POLL_S)
    with RunGuard(check_cancelled, what="the search's models (latency re-measure)") as guard:
        timers = {k: _Timer(p, threads, batch_size, provider, prompt_tokens, data, guard) for k, p in paths.items()}
        return _interleave(timers, warmup, runs, rounds, check_cancelled)


def _interleave(timers: dict[str, _Timer], warmup: int, runs: int, rounds: int,
                check_cancelled: Callable[[], None]) -> dict[str, dict[str, Any]]:
    for t in timers.values():
        t.time(warmup, 1, check_cancelled)
    per_round = max(1, runs // rounds)
    medians: dict[str, list[float]] = {k: [] for k in timers}
    mins: dict[str, float] = {k: float("inf") for k in timers}
    keys = list(timers)
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            check_cancelled()
            ms = timers[k].time(0, per_round, check_cancelled)
            medians[k].append(ms["median"])
            mins[k] = min(mins[k], ms["min"])
    return {k: {"median": statistics.median(v), "min": mins[k], "rounds": float(rounds), "round_medians": v}
            for k, v in medians.items()}


def _eval_loader(spec: JobSpec, folder: Path) -> Callable[[Path], ArrayDataset | None] | None:
    """Loads the eval set shaped for an ONNX file, for the re-measure's batches (array formats only: text
    needs the tokenizer of an hf upload); None without eval data or for other formats."""
    ref = spec.data.eval or next((t.data.eval for _, step in spec.step_paths() for t in getattr(step, "tasks", None)
                                  or [] if t.data.eval), None)  # multi-task trials: the first task's eval rows
    if ref is None:
        return None
    refs = dataset_refs(spec, folder)
    path, fmt, meta = refs[ref]
    if fmt not in ("npz", "imagefolder"):
        return None

    def load(onnx_path: Path) -> ArrayDataset | None:
        import onnx

        from worker.core import WorkingModel
        from worker.formats import load_dataset

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        init = {i.name for i in graph.initializer}
        model = WorkingModel("onnx", "onnx", [i.name for i in graph.input if i.name not in init],
                             [o.name for o in graph.output], onnx_path=onnx_path)
        data = load_dataset(path, fmt, meta, model, spec, folder / onnx_path.parent.name)
        return data.take(spec.evaluate.max_samples) if spec.evaluate.max_samples else data

    return load


def _check_cancel(job_id: str) -> None:
    """SearchCancelled when the search is no longer running (a cancel arrived)."""
    with session_scope() as s:
        status = s.scalar(select(Job.status).where(Job.id == job_id))
    if status != RUNNING:
        raise SearchCancelled(job_id)


def finalize(claim: Claim) -> str:
    """Re-measure the finalists' and the input's latency, pick the winner meeting the constraints that beats
    the input, adopt its artifacts (beating the search's heartbeat meanwhile, so a worker that dies here is
    taken over). A cancel seen between rounds ends the search ``cancelled``."""
    beat = Heartbeat(claim, max(1.0, get_settings().job_lease_seconds / 4))
    beat.start()
    try:
        with _phase("finalize"):
            return _finalize(claim)
    except SearchCancelled:
        finish(claim, CANCELLED, message="cancelled (while finalizing)")
        return CANCELLED
    finally:
        beat.stopped.set()
        shutil.rmtree(get_settings().home / "work" / claim.job_id, ignore_errors=True)


def _finalists(table: list[dict[str, Any]]) -> list[str]:
    """The trials worth re-measuring: those meeting the quality constraints on the size/metric or
    latency/metric Pareto front, and every one within ``SIZE_TIE`` of the smallest (a size tie goes to
    the faster)."""
    ok = [t for t in table if t["state"] == SUCCEEDED and "met" in t and not t.get("baseline")
          and not [m for m in t.get("misses") or [] if not m.startswith("latency")]]
    points = [(t["job_id"], float(t.get("size_bytes") or 0), float(t.get("metric") or 0)) for t in ok]
    points_lat = [(t["job_id"], float(t.get("latency_ms") or 0), float(t.get("metric") or 0)) for t in ok]
    smallest = min((float(t.get("size_bytes") or 0) for t in ok), default=0.0)
    near = {t["job_id"] for t in ok if float(t.get("size_bytes") or 0) <= smallest * (1 + SIZE_TIE)}
    return sorted(set(pareto(points)) | set(pareto(points_lat)) | near)[:MAX_FINALISTS]


def _input_path(table: list[dict[str, Any]], input_key: str | None, workdir: Path) -> Path | None:
    """The input model as an ONNX file: the upload itself, or the baseline trial's output (None: neither)."""
    store = get_store()
    if input_key is not None:
        return store.local_copy(input_key, workdir / "input")
    base = next((t for t in table if t.get("baseline") and t["state"] == SUCCEEDED), None)
    art = _artifacts(base["job_id"]).get("model.onnx") if base else None
    return store.local_copy(art.storage_key, workdir / "input") if art is not None else None


def _prompt_tokens(spec: JobSpec, job_ids: list[str]) -> int:
    """The prefill length the trials' LM evaluations timed (clipped to the model's context there)."""
    for jid in job_ids:
        setup = (_child_report(jid).get("output") or {}).get("latency_setup") or {}
        if isinstance(setup.get("prompt_tokens"), int):
            return int(setup["prompt_tokens"])
    return spec.evaluate.generation.prompt_tokens


def _judge(objective: str, table: list[dict[str, Any]], remeasured: dict[str, dict[str, Any]],
           static_possible_on_conv: bool = False) -> list[dict[str, Any]]:
    """Each re-measured trial meeting the constraints, best first (the objective's ``order``), with
    ``final_ratio`` (its objective over the input's), ``margin`` (the noise it must beat the input by) and
    ``beats_input``, as the objective's ``judge`` (``models/objectives.py``) says: latency in paired
    interleaved rounds with the input, size in exact bytes. A trial ``barred_winner`` names never beats it."""
    kind = OBJECTIVES[objective]
    met = [t for t in table if t.get("job_id") in remeasured and t.get("met") and not t.get("baseline")]
    for t in met:
        v = kind.judge(t, remeasured[t["job_id"]], remeasured.get("input"))
        if v.worst_round is not None:
            t["worst_round_ratio"] = v.worst_round
        t["final_ratio"] = v.value / v.ref if v.value and v.ref else None
        t["margin"] = v.margin
        t["beats_input"] = beats_input(objective, v.value, v.ref, v.margin)
        barred = barred_winner(t["steps"], static_possible_on_conv)
        if barred:
            t["beats_input"], t["barred"] = False, barred
    return kind.order(met, remeasured)


def _finalize(claim: Claim) -> str:
    from worker.evaluate import available_cores

    settings = get_settings()
    with session_scope() as s:
        job = s.get(Job, claim.job_id)
        assert job is not None
        spec = JobSpec.model_validate(job.spec)
        owner = job.owner
        state = json.loads(json.dumps(job.progress["metrics"]["search"]))
        model = s.get(Model, spec.model)
        assert model is not None
        input_key = model.storage_key if model.format == "onnx" else None  # an hf upload is no ONNX file
        static_on_conv = conv_heavy(model.format, dict(model.meta)) and _has_data(spec)
    search = spec.search
    assert search is not None
    constraints = search.constraints.model_dump()
    table: list[dict[str, Any]] = state["trials"]
    lat = spec.evaluate.latency
    workdir = settings.home / "work" / claim.job_id / "finalize"
    workdir.mkdir(parents=True, exist_ok=True)
    _check_cancel(claim.job_id)
    remeasured: dict[str, dict[str, Any]] = {}
    synthetic, lm = True, False
    with _phase("finalize"):
        front = _finalists(table)
        if front:
            store = get_store()
            paths = {jid: store.local_copy(_artifacts(jid)["model.onnx"].storage_key, workdir / jid) for jid in front}
            input_path = _input_path(table, input_key, workdir)
            if input_path is not None:
                paths["input"] = input_path
            lm = _is_lm_file(paths[front[0]])
            loader = _eval_loader(spec, workdir / "data")
            remeasured = remeasure(paths, max(1, min(lat.threads, available_cores())), lat.batch_size,
                                   lat.warmup, lat.runs, data=loader, provider=lat.provider,
                                   prompt_tokens=_prompt_tokens(spec, front),
                                   check_cancelled=lambda: _check_cancel(claim.job_id))
            synthetic = loader is None
        for t in table:
            t["pareto"] = t["job_id"] in front
            if t["job_id"] in remeasured:
                t["latency_ms_remeasured"] = remeasured[t["job_id"]]["median"]
                t["misses"] = meets(constraints, _child_report(t["job_id"]), spec.task,
                                    latency_ms=remeasured[t["job_id"]]["median"])
                t["met"] = not t["misses"]
        ranked = _judge(search.objective, table, remeasured, static_on_conv)
    inp = remeasured.get("input") or {}
    section: dict[str, Any] = {
        "objective": search.objective, "constraints": constraints, "trials": [_trial_view(t) | {
            "pareto": t.get("pareto", False), "latency_ms_remeasured": t.get("latency_ms_remeasured")}
            for t in table],
        "pareto": front, "input_latency_ms_remeasured": inp.get("median"), "fp16_probe": state.get("fp16_probe"),
        "input_noise": noise_margin(inp["round_medians"]) if inp else None,
        "latency_harness": {"rounds": LATENCY_ROUNDS, "runs": lat.runs, "threads": lat.threads,
                            "batch_size": lat.batch_size, "interleaved": True, "synthetic_inputs": synthetic,
                            "input_included": bool(inp), "lm_prefill": lm},
        **_counts(table),
    }
    if not ranked:
        section["best"] = None
        finish(claim, FAILED, result={"report": {"search": section}},
                error={"code": "no_trial_met_constraints", "step": "search",
                       "message": f"none of {len(table)} trials met the constraints; see the trials table"},
                message="failed: no trial met the constraints")
        return FAILED
    winners = [t for t in ranked if t["beats_input"]]
    if not winners:
        return _no_improvement(claim, search.objective, ranked[0], section)
    win = winners[0]
    best = {"trial": win["index"], "job_id": win["job_id"], "label": win["label"], "steps": win["steps"],
            "metric": win.get("metric"), "size_bytes": win.get("size_bytes"),
            "latency_ms": win.get("latency_ms_remeasured"), "objective_ratio": win.get("final_ratio"),
            "margin": win.get("margin")}
    section["best"] = best
    _check_cancel(claim.job_id)
    with _phase("adopt"):
        report = {**_child_report(win["job_id"]), "search": section}
        report_path = workdir / "report.json"
        report_path.write_text(json.dumps(report, indent=2, default=str))
        ids = _adopt(claim, owner, win["job_id"], report_path)
        if ids is None:
            finish(claim, FAILED, error={"code": "winner_deleted", "step": "search",
                                         "message": f"trial {win['job_id']} was deleted before the search adopted it"},
                   message="failed: the winning trial was deleted")
            return FAILED
        finish(claim, SUCCEEDED, result={"artifact_ids": ids, "report": report, "best": best,
                                          "warnings": report.get("warnings") or []},
                message=f"succeeded: trial {win['index']} ({win['label']}) wins")
    return SUCCEEDED


def _no_improvement(claim: Claim, objective: str, closest: dict[str, Any], section: dict[str, Any]) -> str:
    """End the search ``failed`` with ``no_improvement``: trials met the constraints but none beat the
    input on the objective by more than the noise; every trial is kept and the closest one named."""
    ratio = closest.get("final_ratio")
    section["best"] = None
    section["closest"] = {"trial": closest["index"], "job_id": closest["job_id"], "label": closest["label"],
                          "objective_ratio": ratio, "margin": closest.get("margin")}
    what = f"{ratio:.3f}x the input's {objective}" if ratio else f"an unmeasured {objective}"
    finish(claim, FAILED, result={"report": {"search": section}},
            error={"code": "no_improvement", "step": "search",
                   "message": f"no trial beat the input on {objective} by more than the measured noise; "
                              f"closest: trial {closest['index']} ({closest['label']}) at {what} "
                              f"(needed below {1 - (closest.get('margin') or 0):.3f}x); its model stays "
                              "downloadable from its trial"},
            message="failed: no trial beat the input")
    return FAILED


def _child_report(job_id: str) -> dict[str, Any]:
    with session_scope() as s:
        child = s.get(Job, job_id)
        return dict((child.result or {}).get("report") or {}) if child is not None else {}


def _adopt(claim: Claim, owner: str, winner_id: str, report_path: Path) -> list[str] | None:
    """The winner's artifacts become the search's own (same blobs: storage is by content), with the
    search's report.json (the winner's report plus the search section); None if they were deleted meanwhile."""
    trial = {"trial_job_id": winner_id}
    ids = reuse_artifacts(claim, owner, winner_id, skip=frozenset({"report.json"}), meta=trial)
    if ids is None:
        return None
    return ids + store_artifacts(claim, owner, {"report.json": ("report", report_path)}, meta=trial)
