"""The task adapters of ``adapters: merge`` as child jobs (``worker/children.py``, as the single-task baselines):
one per task, the job's steps up to the merge step with ``adapter_task`` naming the task (its weight, the merge
methods and density at their defaults, no ``adapter_files``, no accuracy budget: jobs that differ only in how they
merge share them through the whole-job cache). Each child trains its task's adapter on the task's train rows less the carved validation split, from the
same seed, rank and epochs as the job would, and keeps it as its ``adapter.zip`` artifact.

:func:`start` queues them before the job's pipeline (they run beside its first steps); the merge step asks the
context's ``task_adapters`` (:class:`AdapterJobs`) for them, which waits (events and progress as each ends, running
a still-queued one on this worker, the parent's cancel ending the wait) and fetches each ``adapter.zip``; a child
that failed or was cancelled fails the step, naming the task and why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from models.db import session_scope
from models.spec import FinetuneStep, JobSpec, MergeConfig
from models.tables import SUCCEEDED, Artifact
from storage import get_store
from worker import children
from worker.children import TaskJob
from worker.core import PassContext, StepFailed
from worker.passes.adapters import ADAPTER_FILE
from worker.records import Claim, add_event

TAG = "adapter_of"  # an adapter job's metadata key: "<step index>:<task name>"


def adapter_spec(spec: JobSpec, i: int, task: str) -> JobSpec:
    """The job ``spec`` up to its step ``i``, that step training ``task``'s adapter alone (``adapter_task``)."""
    step = spec.steps[i]
    assert isinstance(step, FinetuneStep) and step.tasks is not None
    doc = spec.model_dump(mode="json")
    doc["steps"] = doc["steps"][:i + 1]
    # its output (that adapter merged, the other tasks' heads as initialised) is a by-product: no budget to hold
    doc["evaluate"] = {**doc["evaluate"], "max_accuracy_drop": None, "max_perplexity_increase": None}
    validation = (step.merge or MergeConfig()).validation
    doc["steps"][i] = {**doc["steps"][i], "adapter_task": task, "merge": {"validation": validation}, "adapter_files": False,
                       "tasks": [{**t, "weight": 1.0} for t in doc["steps"][i]["tasks"]]}
    return JobSpec.model_validate(doc)


def merge_steps(spec: JobSpec) -> list[int]:
    """The steps of ``spec`` that merge task adapters (not a child's own ``adapter_task`` step)."""
    return [i for i, s in enumerate(spec.steps)
            if isinstance(s, FinetuneStep) and s.tasks and s.adapters == "merge" and s.adapter_task is None]


@dataclass
class AdapterJobs:
    """The adapter jobs of one job: what its merge steps' ``task_adapters`` hands out."""

    claim: Claim
    spec: JobSpec
    items: list[TaskJob]
    run_here: Callable[[str], None]

    def fetch(self, params: FinetuneStep, ctx: PassContext) -> dict[str, tuple[str, Path]]:
        """Each task's adapter job and ``adapter.zip``, once every adapter job of this step ended."""
        i = next((k for k, s in enumerate(self.spec.steps) if s is params), None)
        if i is None:
            i = self.spec.steps.index(params)
        mine = [x for x in self.items if x.step == i]
        total = len(mine)

        def ended(item: TaskJob) -> None:
            done = sum(x.status is not None for x in mine)
            ctx.log(f"adapter job of task {item.task!r} {item.status}", task=item.task, job=item.job_id,
                    status=item.status, **({"error": item.error} if item.error else {}))
            ctx.progress(f"adapters trained: {done}/{total} jobs ended", fraction=0.9 * done / total)
            if item.status != SUCCEEDED:
                raise _failed(item)  # no need to wait for the others: the job fails (and cancels them)

        waiting = [x for x in mine if x.status is None]
        ctx.progress(f"waiting for {len(waiting)} adapter jobs ({total - len(waiting)} from the cache)",
                     fraction=0.9 * (total - len(waiting)) / total)
        children.wait(self.claim, waiting, self.run_here, ctx.check_cancelled, ended)
        return {x.task: (str(x.source), _adapter_file(x, ctx.workdir / "adapters" / x.task)) for x in mine}


def _failed(item: TaskJob) -> StepFailed:
    why = (item.error or {}).get("message") or f"it ended {item.status}"
    return StepFailed("adapter_failed", f"task {item.task!r}: its adapter job {item.job_id} {item.status}: {why}")


def _adapter_file(item: TaskJob, dest: Path) -> Path:
    """The ``adapter.zip`` artifact of ``item``'s job (or the cached job's), as a local file."""
    with session_scope() as s:
        key = s.scalar(select(Artifact.storage_key).where(Artifact.job_id == item.source, Artifact.name == ADAPTER_FILE))
    if key is None:
        raise StepFailed("adapter_missing", f"task {item.task!r}: job {item.source} kept no {ADAPTER_FILE}")
    dest.mkdir(parents=True, exist_ok=True)
    return get_store().local_copy(key, dest)


def start(claim: Claim, owner: str, spec: JobSpec, run_here: Callable[[str], None]) -> AdapterJobs | None:
    """The adapter jobs of every merge step of ``spec``, from the cache or queued (None: no merge step)."""
    items = [TaskJob(i, t.name, adapter_spec(spec, i, t.name)) for i in merge_steps(spec)
             for t in getattr(spec.steps[i], "tasks", None) or []]
    if not items:
        return None
    queued = children.start(claim, owner, spec.cache, TAG, items, "adapter")
    cached = [x.task for x in items if x.cached_from]
    add_event(claim.job_id, "log", f"task adapters: {len(queued)} jobs queued"
              + (f", {len(cached)} from the cache ({', '.join(cached)})" if cached else ""),
              adapters=[{"task": x.task, "job_id": x.job_id, "cached_from": x.cached_from} for x in items])
    return AdapterJobs(claim, spec, items, run_here)
