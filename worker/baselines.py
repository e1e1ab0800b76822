"""Single-task baselines of a multi-task step (``baselines: single_task``): one sibling job per task, spread over
the workers as a search's trials are (docs/architecture.md §10), each the same step with that task alone (the
steps before it too, the same epochs, learning rate and seed: the same budget), its metric set beside the
multi-task model's in the report.

:func:`start` (before the job's own pipeline) takes each baseline from the whole-job cache when an identical
single-task job of the owner succeeded before (same model sha, task data shas and parameters: its key), and
otherwise queues it as a child job of this one. :func:`collect` (after the pipeline) waits for them; a baseline
still queued then is run here, by the job's own worker (a one-slot worker would otherwise wait on itself). A
baseline that failed leaves its task's row without one (the job itself still succeeds). The job's end, however it
ends, cancels the baselines still queued or running (:func:`cancel`). Queueing, waiting and cancelling are
``worker/children.py``'s, shared with the task adapters of ``adapters: merge``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from models.spec import FinetuneStep, JobSpec
from worker import children
from worker.children import TaskJob
from worker.records import Claim, add_event

TAG = "baseline_of"  # a baseline job's metadata key: "<step index>:<task name>"
Baseline = TaskJob  # one task's single-task run: its child job, or the cached job whose report stands for it
cancel = children.cancel  # the job's end cancels its baselines not yet ended


@dataclass
class Baselines:
    """The baselines one job asked for."""

    items: list[Baseline] = field(default_factory=list)


def single_task_spec(spec: JobSpec, i: int, task: str) -> JobSpec:
    """The job ``spec`` up to its step ``i`` with that step's tasks cut to ``task`` (no baselines of its own). What
    only mixes tasks (sampling, temperature, the task's weight) is put at its default, so a job that changes only
    the mixing finds its baselines in the cache."""
    step = spec.steps[i]
    assert isinstance(step, FinetuneStep) and step.tasks is not None
    only = [{**t.model_dump(mode="json"), "weight": 1.0} for t in step.tasks if t.name == task]
    doc = spec.model_dump(mode="json")
    doc["steps"] = doc["steps"][:i + 1]
    fields = FinetuneStep.model_fields
    doc["steps"][i] = {**doc["steps"][i], "tasks": only, "baselines": None,
                       "sampling": fields["sampling"].default, "temperature": fields["temperature"].default}
    return JobSpec.model_validate(doc)


def start(claim: Claim, owner: str, spec: JobSpec) -> Baselines:
    """Each asked-for baseline from the cache, or queued as a child job of this one (started already: a retried
    attempt finds its children and keeps them)."""
    out = Baselines([Baseline(i, t.name, single_task_spec(spec, i, t.name)) for i, s in enumerate(spec.steps)
                     if isinstance(s, FinetuneStep) and s.baselines for t in s.tasks or []])
    if not out.items:
        return out
    queued = children.start(claim, owner, spec.cache, TAG, out.items, "single-task baseline")
    cached = [b.task for b in out.items if b.cached_from]
    add_event(claim.job_id, "log", f"single-task baselines: {len(queued)} queued"
              + (f", {len(cached)} from the cache ({', '.join(cached)})" if cached else ""),
              baselines=[{"task": b.task, "job_id": b.job_id, "cached_from": b.cached_from} for b in out.items])
    return out


def collect(claim: Claim, baselines: Baselines, run_here: Callable[[str], None],
            check_cancelled: Callable[[], None]) -> None:
    """Wait for every baseline to end (running a queued one here with ``run_here``); note each one's report."""
    pending = [b for b in baselines.items if b.job_id and b.report is None]
    if pending:
        add_event(claim.job_id, "log", f"waiting for {len(pending)} single-task baselines")
    children.wait(claim, pending, run_here, check_cancelled)


def _step_multitask(report: dict[str, Any], i: int) -> dict[str, Any] | None:
    steps = report.get("steps") or []
    if i >= len(steps) or not isinstance(steps[i], dict):
        return None
    found = (steps[i].get("metrics") or {}).get("multitask")
    return found if isinstance(found, dict) else None


def annotate(report: dict[str, Any], baselines: Baselines) -> None:
    """Set each task's single-task metric beside the multi-task one in ``report`` (its step's ``multitask``
    section): ``single_task``, ``vs_single_task`` (multi minus single), where it came from; and the N single-task
    models' measured size against the shared one's."""
    by_step: dict[int, list[Baseline]] = {}
    for b in baselines.items:
        by_step.setdefault(b.step, []).append(b)
    for i, items in by_step.items():
        mt = _step_multitask(report, i)
        if mt is None:
            continue
        rows = {r.get("task"): r for r in mt.get("tasks") or [] if isinstance(r, dict)}
        separate_bytes = 0
        complete = True
        jobs: list[dict[str, Any]] = []
        for b in items:
            row = rows.get(b.task)
            theirs = _step_multitask(b.report or {}, i)
            their_row = next((r for r in (theirs or {}).get("tasks") or [] if r.get("task") == b.task), None)
            jobs.append({"task": b.task, "job_id": b.job_id or b.cached_from, "cached": b.cached_from is not None,
                         "status": b.status, **({"error": b.error} if b.error else {})})
            their_bytes = ((theirs or {}).get("size") or {}).get("shared_bytes")
            if isinstance(their_bytes, int | float):
                separate_bytes += int(their_bytes)
            else:
                complete = False
            if row is None:
                continue
            row["single_task_job"] = b.job_id or b.cached_from
            row["single_task_cached"] = b.cached_from is not None
            single = their_row.get("after") if their_row else None
            row["single_task"] = single
            after = row.get("after")
            row["vs_single_task"] = (float(after) - float(single)
                                     if isinstance(after, int | float) and isinstance(single, int | float) else None)
            if single is None:
                row["single_task_error"] = (b.error or {}).get("message") or f"the baseline ended {b.status}"
        section: dict[str, Any] = {"kind": "single_task", "jobs": jobs,
                                   "budget": "the same step, epochs and seed over the task's rows alone"}
        size = mt.get("size") or {}
        if complete and separate_bytes and isinstance(size.get("shared_bytes"), int | float):
            section["separate_bytes"] = separate_bytes
            section["shared_bytes"] = size["shared_bytes"]
            section["ratio"] = float(size["shared_bytes"]) / separate_bytes
        mt["baselines"] = section
