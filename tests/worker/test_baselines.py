"""Single-task baselines of a multi-task step: each baseline job's spec (the step with one task, the mixing at its
defaults so only the budget counts) and the report's rows once the baselines ended."""

from __future__ import annotations

from typing import Any

from models.spec import JobSpec
from worker.baselines import Baseline, Baselines, annotate, single_task_spec


def _spec(**step: Any) -> JobSpec:
    return JobSpec.model_validate({
        "model": "mdl_x", "task": "image-classification", "seed": 3,
        "steps": [{"type": "prune", "method": "structured", "ratio": 0.25},
                  {"type": "finetune", "epochs": 2, "lr": 1e-3, "baselines": "single_task", "sampling": "temperature",
                   "temperature": 3.0, **step, "tasks": [
                       {"name": "a", "data": {"train": "ds_a", "eval": "ds_ae"}, "weight": 2.0},
                       {"name": "b", "data": {"train": "ds_b", "eval": "ds_be"}}]},
                  {"type": "quantize", "mode": "dynamic"}],
    })


def test_a_baseline_is_the_step_with_one_task_and_the_same_budget() -> None:
    one = single_task_spec(_spec(), 1, "a")
    assert [s.type for s in one.steps] == ["prune", "finetune"]  # the steps before it, none after
    step = one.steps[1]
    assert step.tasks is not None and [t.name for t in step.tasks] == ["a"] and step.tasks[0].weight == 1.0
    assert (step.epochs, step.lr, one.seed, step.baselines) == (2, 1e-3, 3, None)
    assert (step.sampling, step.temperature) == ("proportional", 2.0)
    # a job that changes only the mixing asks for the same baselines (the cache finds them)
    assert single_task_spec(_spec(sampling="uniform", temperature=2.0), 1, "a") == one
    assert single_task_spec(_spec(epochs=3), 1, "a") != one


def _report(tasks: list[dict[str, Any]], shared_bytes: int) -> dict[str, Any]:
    return {"steps": [{}, {"metrics": {"multitask": {"tasks": tasks, "size": {"shared_bytes": shared_bytes}}}}]}


def test_annotate_sets_single_task_beside_multi_task() -> None:
    report = _report([{"task": "a", "after": 0.9}, {"task": "b", "after": 0.6}], 1000)
    spec = _spec()
    done = Baselines([
        Baseline(1, "a", single_task_spec(spec, 1, "a"), job_id="job_a", status="succeeded",
                 report=_report([{"task": "a", "after": 0.85}], 900)),
        Baseline(1, "b", single_task_spec(spec, 1, "b"), cached_from="job_old", status="succeeded",
                 report=_report([{"task": "b", "after": 0.7}], 900)),
    ])
    annotate(report, done)
    mt = report["steps"][1]["metrics"]["multitask"]
    a, b = mt["tasks"]
    assert (a["single_task"], round(a["vs_single_task"], 6), a["single_task_job"], a["single_task_cached"]) == (
        0.85, 0.05, "job_a", False)
    assert (b["single_task"], round(b["vs_single_task"], 6), b["single_task_job"], b["single_task_cached"]) == (
        0.7, -0.1, "job_old", True)
    assert (mt["baselines"]["separate_bytes"], mt["baselines"]["ratio"]) == (1800, 1000 / 1800)


def test_a_failed_baseline_leaves_its_row_without_one() -> None:
    report = _report([{"task": "a", "after": 0.9}, {"task": "b", "after": 0.6}], 1000)
    spec = _spec()
    done = Baselines([
        Baseline(1, "a", single_task_spec(spec, 1, "a"), job_id="job_a", status="failed",
                 error={"code": "internal_error", "message": "boom"}),
        Baseline(1, "b", single_task_spec(spec, 1, "b"), job_id="job_b", status="cancelled"),
    ])
    annotate(report, done)
    mt = report["steps"][1]["metrics"]["multitask"]
    assert [(r["single_task"], r["vs_single_task"], r["single_task_error"]) for r in mt["tasks"]] == [
        (None, None, "boom"), (None, None, "the baseline ended cancelled")]
    assert "separate_bytes" not in mt["baselines"] and mt["baselines"]["jobs"][0]["error"]["message"] == "boom"


def test_a_job_that_ended_cancels_its_unfinished_baselines(pg_env: str) -> None:
    from models.db import session_scope
    from models.tables import Job
    from tests.api import builders
    from worker.baselines import cancel

    model = builders.insert_model()
    parent = builders.insert_job(model, status="failed")
    kids = {s: builders.insert_job(model, status=s) for s in ("queued", "running", "succeeded")}
    other = builders.insert_job(model, status="queued")  # not a child of it
    with session_scope() as s:
        for kid in kids.values():
            row = s.get(Job, kid)
            assert row is not None
            row.parent_id = parent
    cancel(parent)
    with session_scope() as s:
        states = {k: (s.get(Job, v).status, s.get(Job, v).cancel_requested) for k, v in kids.items()}  # type: ignore[union-attr]
        assert s.get(Job, other).status == "queued"  # type: ignore[union-attr]
    assert states == {"queued": ("cancelled", True), "running": ("cancelling", True), "succeeded": ("succeeded", False)}
