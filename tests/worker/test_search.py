"""The search worker: the trial plan, the interleaved latency re-measurement, and advance on real rows."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from models.db import session_scope
from models.ids import new_id
from models.spec import JobSpec
from models.tables import Job, JobEvent, Model
from tests.worker.conftest import DigitsFiles
from worker import search


def _spec(space: list[list[dict[str, Any]]], **search_kw: Any) -> JobSpec:
    return JobSpec.model_validate({"model": "mdl_x", "task": "image-classification", "data": {"eval": "ds_e"},
                                   "search": {"space": space, **search_kw}})


def test_plan_is_cheapest_first_and_skips_past_max_trials() -> None:
    space = [[{"type": "quantize", "mode": "static"}], [{"type": "quantize", "mode": "fp16"}],
             [{"type": "quantize", "mode": "dynamic"}]]
    table = search.plan(_spec(space, budget={"max_trials": 2}), "onnx", {})
    assert [t["label"] for t in table] == ["quantize (fp16)", "quantize (dynamic)", "quantize (static)"]
    assert [t["state"] for t in table] == ["pending", "pending", "skipped"]
    assert table[2]["reason"] == "budget: max_trials 2"
    auto = search.plan(JobSpec.model_validate({"model": "m", "data": {"eval": "e"}, "search": {}}), "onnx", {})
    assert {t["label"] for t in auto} == {"quantize (fp16)", "quantize (dynamic)", "quantize (static)"}


def test_remeasure_times_every_model_in_interleaved_rounds(digits_mlp: DigitsFiles) -> None:
    got = search.remeasure({"a": digits_mlp.model, "b": digits_mlp.model}, threads=1, batch_size=4, warmup=1,
                           runs=10, rounds=5)
    assert set(got) == {"a", "b"}
    for v in got.values():
        assert v["rounds"] == 5 and 0 < v["min"] <= v["median"] < 1000


def _rows(spec: JobSpec, trials: list[dict[str, Any]]) -> tuple[str, str]:
    with session_scope() as s:
        m = Model(id=new_id("mdl"), owner="local", name="m", format="onnx", sha256="0" * 64, size_bytes=1,
                  storage_key="0" * 64, meta={})
        s.add(m)
        s.flush()
        body = spec.model_dump(mode="json") | {"model": m.id}
        parent = Job(id=new_id("job"), owner="local", status="running", spec=body, model_id=m.id, queue="cpu",
                     attempt=1, max_attempts=3,
                     progress={"metrics": {"search": {"trials": trials, "started": 0.0, "best": None}}})
        s.add(parent)
        return parent.id, m.id


def _missed_report(drop: float) -> dict[str, Any]:
    """A trial report's shape (pipeline.build_report) for a trial that lost ``drop`` accuracy."""
    return {"budget": {"accuracy_drop": drop, "met": False}, "input": {"size_bytes": 1000},
            "output": {"size_bytes": 300, "metric": {"name": "accuracy", "value": 0.95 - drop}}}


def test_no_trial_meeting_the_constraints_fails_the_search_keeping_the_trials(
    pg_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[str] = []
    monkeypatch.setattr("worker.celery_app.enqueue_job", lambda job_id, queue: started.append(job_id))
    space = [[{"type": "quantize", "mode": "fp16"}], [{"type": "quantize", "mode": "dynamic"}],
             [{"type": "quantize", "mode": "static"}]]
    spec = _spec(space, constraints={"max_accuracy_drop": 0.01}, parallelism=2, objective="size")
    table = search.plan(spec, "onnx", {})
    parent, _ = _rows(spec, table)
    assert search.advance(parent) == "running"
    assert len(started) == 2  # parallelism 2: the third waits
    with session_scope() as s:
        kids = list(s.scalars(select(Job).where(Job.parent_id == parent).order_by(Job.id)))
        # the two cheapest trials started (ids made in the same millisecond do not sort by creation)
        assert sorted(k.spec["steps"][0]["mode"] for k in kids) == ["dynamic", "fp16"]
        assert all(k.spec["evaluate"]["max_accuracy_drop"] == 0.01 and k.owner == "local" for k in kids)
        for k in kids:  # both miss the accuracy budget, as a real trial reports it
            k.status = "failed"
            k.result = {"report": _missed_report(0.05)}
            k.error = {"code": "accuracy_budget_exceeded", "step": "evaluate", "message": "accuracy -5 points"}
    assert search.advance(parent) == "failed"
    with session_scope() as s:
        job = s.get(Job, parent)
        assert job is not None and job.error is not None
        assert job.error["code"] == "no_trial_met_constraints"
        trials = job.result["report"]["search"]["trials"]  # type: ignore[index]
        messages = [e.message for e in s.scalars(select(JobEvent).where(JobEvent.job_id == parent))]
    assert [t["state"] for t in trials] == ["failed", "failed", "skipped"]
    # static INT8 is riskier than dynamic INT8, which already missed the accuracy budget.
    assert trials[2]["reason"].startswith("dominated")
    assert len(started) == 2  # the dominated trial never became a job
    assert any("skipped: dominated" in m for m in messages)


def test_advance_of_a_finished_or_unknown_search_does_nothing(pg_env: str) -> None:
    assert search.advance("job_nope") is None
    spec = _spec([[{"type": "quantize"}]])
    parent, _ = _rows(spec, search.plan(spec, "onnx", {}))
    with session_scope() as s:
        job = s.get(Job, parent)
        assert job is not None
        job.status = "succeeded"
    assert search.advance(parent) == "succeeded"


def test_a_finalize_whose_worker_died_is_taken_over(pg_env: str) -> None:
    from datetime import timedelta

    from models.tables import utcnow

    spec = _spec([[{"type": "quantize", "mode": "fp16"}]], constraints={"max_accuracy_drop": 0.01})
    table = search.plan(spec, "onnx", {})
    table[0].update(state="failed", job_id="job_gone", met=False, misses=["quality: accuracy drop 0.05 > 0.01"])
    parent, _ = _rows(spec, table)
    with session_scope() as s:
        job = s.get(Job, parent)
        assert job is not None
        job.progress = {"metrics": {"search": {"trials": table, "started": 0.0, "finalizing": True}}}
        job.heartbeat_at = utcnow() - timedelta(hours=1)  # the finalizing worker stopped beating long ago
    assert search.advance(parent) == "failed"
    with session_scope() as s:
        job = s.get(Job, parent)
        assert job is not None and job.error is not None and job.error["code"] == "no_trial_met_constraints"
