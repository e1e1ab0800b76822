"""``modelpress optimize --auto``: submit a search and stream its trials as they finish."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from client.jobs import Job
from models.report import Trial


def build_search_spec(
    model: str,
    data: dict[str, str],
    *,
    task: str | None = None,
    objective: str = "latency",
    max_accuracy_drop: float | None = None,
    max_perplexity_increase: float | None = None,
    min_fidelity: float | None = None,
    max_trials: int | None = None,
    parallelism: int | None = None,
    queue: str | None = None,
    latency: dict[str, Any] | None = None,
    model_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The job spec of an ``auto`` search (the service derives the trials from the model and the data).

    Without ``task``, the task the upload's inspection found (``model_meta["task"]``: an hf causal LM is
    ``text-generation``, so it gets the LM space with its INT4 trials, not the generic one)."""
    search: dict[str, Any] = {"objective": objective, "space": "auto"}
    constraints = {k: v for k, v in (("max_accuracy_drop", max_accuracy_drop),
                                     ("max_perplexity_increase", max_perplexity_increase),
                                     ("min_fidelity", min_fidelity)) if v is not None}
    if constraints:
        search["constraints"] = constraints
    if max_trials is not None:
        search["budget"] = {"max_trials": max_trials}
    if parallelism is not None:
        search["parallelism"] = parallelism
    spec: dict[str, Any] = {"model": model, "data": data, "search": search}
    task = task or (model_meta or {}).get("task")
    if task:
        spec["task"] = task
    if latency:
        spec["evaluate"] = {"latency": dict(latency)}
    if queue:
        spec["queue"] = queue
    return spec


def _num(v: Any, unit: str = "") -> str:
    return f"{v:.4g}{unit}" if isinstance(v, int | float) and not isinstance(v, bool) else "-"


def trial_line(trial: Trial) -> str:
    """One finished (or skipped) trial as a line: index, recipe, state, metric, size, latency, why."""
    size = trial.size_bytes
    head = f"trial {trial.index}: {trial.label} — {trial.state}"
    if trial.state == "skipped":
        return f"{head} ({trial.reason or ''})"
    line = (f"{head}: metric {_num(trial.metric)}, size "
            f"{_num(size / 1e6 if size is not None else None, ' MB')}, latency {_num(trial.latency_ms, ' ms')}")
    if trial.met is False:
        line += f" (misses: {'; '.join(trial.misses)})"
    return line


def stream_trials(job: Job, emit: Callable[[str], None]) -> Job:
    """Print each trial as the search records it, until the search ends; the refreshed job."""
    for event in job.events(follow=True):
        trial = (event.data or {}).get("trial")
        if isinstance(trial, dict):
            emit(trial_line(Trial.model_validate(trial)))
    done = job.refresh()
    best = (done.result.best if done.result is not None else None) or {}
    if best:
        emit(f"winner: trial {best.get('trial')} ({best.get('label')}), job {best.get('job_id')}")
    return done
