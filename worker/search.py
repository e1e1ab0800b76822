"""The auto-optimize search (docs/architecture.md §10): trials fanned out as child jobs over the worker fleet.

Event-driven, so the search never holds a worker slot while its trials run (a one-process worker would
deadlock): :func:`start` plans the trials and starts the first ones; each trial's worker, when the trial
ends, queues :func:`advance`, which under the search's row lock records the outcome, skips trials that
cannot win, starts the next ones (at most ``parallelism`` at once) and, when none is left, runs
:func:`finalize` on this one worker: the Pareto candidates' latency re-measured interleaved with one
harness, the winner picked, its model and report made the search's own artifacts.

The plan lives in the search's ``progress.metrics.search`` (trials, their states and outcomes), so the
progress a client reads shows trials done / running / skipped and the best so far.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from models.db import session_scope
from models.ids import new_id
from models.objectives import OBJECTIVES
from models.queues import queued_message
from models.report import Evaluation, Report
from models.search_space import Candidate, Outcome, auto_space, candidates, meets, pareto, skip_reason
from models.settings import get_settings
from models.spec import JobSpec, trial_spec
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
from worker.records import Claim, Heartbeat, dataset_refs, finish, reuse_artifacts, store_artifacts

if TYPE_CHECKING:
    from worker.core import ArrayDataset

log = logging.getLogger(__name__)

PENDING, SKIPPED = "pending", "skipped"
ACTIVE_TRIAL = (QUEUED, RUNNING, CANCELLING)
MAX_FINALISTS = 8
LATENCY_ROUNDS = 5


def _candidate(t: dict[str, Any]) -> Candidate:
    e = t["estimate"]
    return Candidate(t["steps"], e["cost"], e["size_ratio"], e["latency_ratio"], e["risk"], t["label"])


def plan(spec: JobSpec, model_format: str, model_meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The trial table of a search: its candidates cheapest first, those past ``max_trials`` skipped."""
    search = spec.search
    assert search is not None
    if search.space == "auto":
        space = auto_space(spec.task, model_format, model_meta, train=spec.data.train is not None,
                           calibration=bool(spec.data.calibration or spec.data.eval))
    else:
        space = [[s.model_dump(mode="json") for s in steps]
                 for steps in search.space]
    table = []
    for i, c in enumerate(candidates(space)):
        row: dict[str, Any] = {
            "index": i, "label": c.label, "steps": c.steps, "state": PENDING, "job_id": None,
            "estimate": {"cost": c.cost, "size_ratio": c.size_ratio, "latency_ratio": c.latency_ratio,
                         "risk": c.risk},
        }
        if i >= search.budget.max_trials:
            row.update(state=SKIPPED, reason=f"budget: max_trials {search.budget.max_trials}")
        table.append(row)
    return table


def start(claim: Claim, spec: JobSpec, owner: str) -> str:
    """The search's own task: plan the trials (once) and start the first ones; the search stays running."""
    with session_scope() as s:
        job = s.execute(select(Job).where(Job.id == claim.job_id).with_for_update()).scalar_one()
        state = (job.progress or {}).get("metrics", {}).get("search")
        if state is None:
            model = s.get(Model, spec.model)
            assert model is not None
            table = plan(spec, model.format, dict(model.meta))
            state = {"trials": table, "started": time.time(), "best": None}
            job.progress = {"step": 0, "steps": len(table), "percent": 0.0, "metrics": {"search": state}}
            job.phase = "searching"
            s.add(JobEvent(job_id=job.id, kind="log", message=f"search: {len(table)} trials planned",
                           data={"trials": [{"index": t["index"], "label": t["label"]} for t in table]}))
            for t in table:
                if t["state"] == SKIPPED:
                    s.add(JobEvent(job_id=job.id, kind="log", data={"trial": _trial_view(t)},
                                   message=f"trial {t['index']} ({t['label']}) skipped: {t['reason']}"))
    advance(claim.job_id)
    return RUNNING


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


def _outcomes(table: list[dict[str, Any]]) -> list[Outcome]:
    return [Outcome(bool(t.get("met")), t.get("objective_ratio"), t["estimate"]["risk"], t.get("misses") or [])
            for t in table if "met" in t]


def _best(table: list[dict[str, Any]]) -> dict[str, Any] | None:
    met = [t for t in table if t.get("met") and t.get("objective_ratio") is not None]
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


def _take_over_finalize(search_id: str) -> Claim | None:
    """While the search is finalizing, wait for it to end or for its heartbeat (which finalize beats) to go
    stale, i.e. for its worker to have died: then this worker takes finalize over (the claim it runs under).
    None when the search is not finalizing (or ended meanwhile)."""
    lease = get_settings().job_lease_seconds
    deadline = time.monotonic() + lease * 2 + 5
    while time.monotonic() < deadline:
        with session_scope() as s:
            job = s.execute(select(Job).where(Job.id == search_id).with_for_update()).scalar_one_or_none()
            if job is None or job.status not in (RUNNING, CANCELLING):
                return None
            if not ((job.progress or {}).get("metrics", {}).get("search") or {}).get("finalizing"):
                return None
            if job.heartbeat_at is None or job.heartbeat_at < utcnow() - timedelta(seconds=lease):
                job.heartbeat_at = utcnow()
                return Claim(search_id, job.attempt)
        time.sleep(min(2.0, lease / 4))
    return None


def advance(search_id: str) -> str | None:
    """Bring the search up to date (idempotent; under its row lock): record ended trials, skip or start
    the next ones, cancel them all when the search is cancelling, finalize when none is left."""
    to_enqueue: list[tuple[str, str]] = []
    finalize_claim: Claim | None = None
    taken = _take_over_finalize(search_id)
    if taken is not None:
        log.warning("search %s: finalize taken over (the worker finalizing it stopped beating)", search_id)
        return finalize(taken)
    with session_scope() as s:
        job = s.execute(select(Job).where(Job.id == search_id).with_for_update()).scalar_one_or_none()
        if job is None or job.status not in (RUNNING, CANCELLING):
            return None if job is None else job.status
        state = json.loads(json.dumps((job.progress or {}).get("metrics", {}).get("search") or {}))
        if not state or state.get("finalizing"):
            return job.status
        spec = JobSpec.model_validate(job.spec)
        search = spec.search
        assert search is not None
        constraints = search.constraints.model_dump()
        table: list[dict[str, Any]] = state["trials"]
        children = {c.id: c for c in s.scalars(select(Job).where(Job.parent_id == search_id))}
        for t in table:
            child = children.get(t["job_id"] or "")
            if child is None or t["state"] in TERMINAL:
                continue
            if child.status in TERMINAL:
                _outcome(t, child, search.objective, constraints, spec.task)
                s.add(JobEvent(job_id=search_id, kind="log", data={"trial": _trial_view(t)},
                               message=f"trial {t['index']} ({t['label']}) {child.status}"
                                       + ("" if t.get("met") else f": {'; '.join(t.get('misses') or [])}")))
            else:
                t["state"] = child.status
        if job.status == CANCELLING:
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
        else:
            started_at = float(state.get("started", time.time()))
            over_time = search.budget.max_wall_s is not None and time.time() - started_at > search.budget.max_wall_s
            active = sum(t["state"] in ACTIVE_TRIAL for t in table)
            for t in table:
                if t["state"] != PENDING or active >= search.parallelism:
                    continue
                reason = (f"budget: past max_wall_s {search.budget.max_wall_s:g} s" if over_time
                          else skip_reason(_candidate(t), search.objective, _outcomes(table)))
                if reason:
                    t.update(state=SKIPPED, reason=reason)
                    s.add(JobEvent(job_id=search_id, kind="log", message=f"trial {t['index']} ({t['label']}) "
                                   f"skipped: {reason}", data={"trial": _trial_view(t)}))
                    continue
                child_spec = trial_spec(spec, t["steps"])
                child = Job(id=new_id("job"), owner=job.owner, status=QUEUED, phase="queued",
                            progress={"step": 0, "steps": len(child_spec.steps), "percent": 0.0},
                            spec=child_spec.model_dump(mode="json"), model_id=job.model_id,
                            queue=get_settings().queue_for(child_spec), attempt=0, max_attempts=job.max_attempts,
                            parent_id=search_id)
                s.add(child)
                s.add(JobEvent(job_id=child.id, kind="status", message=queued_message(child.queue, get_settings().gpu_queue)
                               + f" (trial {t['index']} of search {search_id})", data={"status": QUEUED}))
                t.update(state=QUEUED, job_id=child.id)
                to_enqueue.append((child.id, child.queue))
                active += 1
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
            "latency_ms", "objective_ratio", "worker", "steps")
    return {k: t[k] for k in keys if k in t}


def _artifacts(job_id: str) -> dict[str, Artifact]:
    with session_scope() as s:
        rows = list(s.scalars(select(Artifact).where(Artifact.job_id == job_id)))
        s.expunge_all()
    return {a.name: a for a in rows}


def remeasure(paths: dict[str, Path], threads: int, batch_size: int, warmup: int, runs: int,
              rounds: int = LATENCY_ROUNDS, data: Callable[[Path], ArrayDataset | None] | None = None,
              ) -> dict[str, dict[str, float]]:
    """Latency of each model, interleaved: ``rounds`` rounds each timing every model for ``runs/rounds``
    runs (the order rotating), one harness and one process, so drift hits all of them alike; on
    ``data(path)``'s samples (the eval set shaped for that model) or synthetic ones.
    ``{id: {median, min, rounds}}`` in milliseconds per batch (the median of the round medians)."""
    from worker.evaluate import latency_batch, make_session, measure_latency

    sessions = {k: make_session(p, threads) for k, p in paths.items()}
    batches = {k: latency_batch(sess, data(paths[k]) if data else None, batch_size) for k, sess in sessions.items()}
    for k, sess in sessions.items():
        measure_latency(sess, batches[k], warmup, 1)
    per_round = max(1, runs // rounds)
    medians: dict[str, list[float]] = {k: [] for k in sessions}
    mins: dict[str, float] = {k: float("inf") for k in sessions}
    keys = list(sessions)
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            ms = measure_latency(sessions[k], batches[k], 0, per_round)["ms"]
            medians[k].append(ms["median"])
            mins[k] = min(mins[k], ms["min"])
    return {k: {"median": statistics.median(v), "min": mins[k], "rounds": float(rounds)} for k, v in medians.items()}


def _eval_loader(spec: JobSpec, folder: Path) -> Callable[[Path], ArrayDataset | None] | None:
    """Loads the eval set shaped for an ONNX file, for the re-measure's batches (array formats only: text
    needs the tokenizer of an hf upload); None without eval data or for other formats."""
    if spec.data.eval is None:
        return None
    refs = dataset_refs(spec, folder)
    path, fmt, meta = refs[spec.data.eval]
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


def finalize(claim: Claim) -> str:
    """Re-measure the finalists' latency, pick the winner meeting the constraints, adopt its artifacts
    (beating the search's heartbeat meanwhile, so a worker that dies here is taken over)."""
    beat = Heartbeat(claim, max(1.0, get_settings().job_lease_seconds / 4))
    beat.start()
    try:
        return _finalize(claim)
    finally:
        beat.stopped.set()


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
    search = spec.search
    assert search is not None
    constraints = search.constraints.model_dump()
    table: list[dict[str, Any]] = state["trials"]
    quality_ok = [t for t in table if t["state"] == SUCCEEDED and "met" in t
                  and not [m for m in t.get("misses") or [] if not m.startswith("latency")]]
    points = [(t["job_id"], float(t.get("size_bytes") or 0), float(t.get("metric") or 0)) for t in quality_ok]
    points_lat = [(t["job_id"], float(t.get("latency_ms") or 0), float(t.get("metric") or 0)) for t in quality_ok]
    front = sorted(set(pareto(points)) | set(pareto(points_lat)))[:MAX_FINALISTS]
    workdir = settings.home / "work" / claim.job_id / "finalize"
    workdir.mkdir(parents=True, exist_ok=True)
    store = get_store()
    remeasured: dict[str, dict[str, float]] = {}
    synthetic = True
    lat = spec.evaluate.latency
    if front:
        paths = {jid: store.local_copy(_artifacts(jid)["model.onnx"].storage_key, workdir / jid) for jid in front}
        if input_key is not None:
            paths["input"] = store.local_copy(input_key, workdir / "input")
        loader = _eval_loader(spec, workdir / "data")
        remeasured = remeasure(paths, max(1, min(lat.threads, available_cores())), lat.batch_size,
                               lat.warmup, lat.runs, data=loader)
        synthetic = loader is None
    for t in table:
        t["pareto"] = t["job_id"] in front
        if t["job_id"] in remeasured:
            t["latency_ms_remeasured"] = remeasured[t["job_id"]]["median"]
            t["misses"] = meets(constraints, _child_report(t["job_id"]), spec.task,
                                latency_ms=remeasured[t["job_id"]]["median"])
            t["met"] = not t["misses"]
    winners = [t for t in table if t["job_id"] in remeasured and t["met"]]
    winners.sort(key=OBJECTIVES[search.objective].rank)
    section: dict[str, Any] = {
        "objective": search.objective, "constraints": constraints, "trials": [_trial_view(t) | {
            "pareto": t.get("pareto", False), "latency_ms_remeasured": t.get("latency_ms_remeasured")}
            for t in table],
        "pareto": front, "input_latency_ms_remeasured": (remeasured.get("input") or {}).get("median"),
        "latency_harness": {"rounds": LATENCY_ROUNDS, "runs": lat.runs, "threads": lat.threads,
                            "batch_size": lat.batch_size, "interleaved": True, "synthetic_inputs": synthetic},
        **_counts(table),
    }
    try:
        if not winners:
            section["best"] = None
            finish(claim, FAILED, result={"report": {"search": section}},
                    error={"code": "no_trial_met_constraints", "step": "search",
                           "message": f"none of {len(table)} trials met the constraints; see the trials table"},
                    message="failed: no trial met the constraints")
            return FAILED
        win = winners[0]
        best = {"trial": win["index"], "job_id": win["job_id"], "label": win["label"], "steps": win["steps"],
                "metric": win.get("metric"), "size_bytes": win.get("size_bytes"),
                "latency_ms": win.get("latency_ms_remeasured")}
        section["best"] = best
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
    finally:
        import shutil

        shutil.rmtree(settings.home / "work" / claim.job_id, ignore_errors=True)


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
