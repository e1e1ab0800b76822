"""worker.context: LocalContext serves models and data from local files and records events;
DBContext writes progress, events and the cancel flag through the jobs table."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from models.db import session_scope
from models.ids import new_id
from models.spec import JobSpec
from models.tables import Job, JobEvent
from tests.api.builders import insert_model
from tests.worker.conftest import DigitsFiles
from worker import context
from worker.context import DBContext, LocalContext
from worker.core import JobCancelled
from worker.records import Claim


def _spec(data: dict[str, str]) -> JobSpec:
    return JobSpec.model_validate({"model": "mdl_mlp", "task": "image-classification", "data": data})


def _local(tmp_path: Path, files: DigitsFiles, data: dict[str, str]) -> LocalContext:
    ctx = files.context(tmp_path / "work", _spec(data))
    ctx.models["../../evil"] = (files.model, "onnx", {})
    return ctx


def test_calibration_falls_back_to_train_then_eval(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    ctx = _local(tmp_path, digits_mlp, {"train": "ds_train", "eval": "ds_eval"})
    assert ctx.dataset_ref("calibration") == "ds_train" and ctx.dataset_ref("eval") == "ds_eval"
    only_eval = _local(tmp_path / "b", digits_mlp, {"eval": "ds_eval"})
    assert only_eval.dataset_ref("calibration") == "ds_eval" and only_eval.dataset_ref("train") is None
    assert only_eval.dataset("train", only_eval.load_model("input")) is None


def test_a_calibrating_job_with_eval_only_splits_eval_disjointly(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    data = {"eval": "ds_eval"}
    steps = [{"type": "quantize", "mode": "static", "calibration": {"samples": 100}}]
    spec = JobSpec.model_validate({"model": "mdl_mlp", "task": "image-classification", "data": data, "steps": steps})
    ctx = digits_mlp.context(tmp_path / "work", spec)
    model = ctx.load_model("input")
    cal, evald = ctx.dataset("calibration", model), ctx.dataset("eval", model)
    assert cal is not None and evald is not None and (len(cal), len(evald)) == (100, 440)  # 540 rows, 100 wanted
    full = ctx.dataset_by_id("ds_eval", model)
    assert full is not None
    rows = {r.tobytes() for r in full.inputs["pixels"]}
    cal_rows, eval_rows = ({r.tobytes() for r in d.inputs["pixels"]} for d in (cal, evald))
    assert not cal_rows & eval_rows and cal_rows | eval_rows == rows
    assert ctx.calibration_split is not None and ctx.calibration_split["calibration_rows"] == 100
    assert [e["message"] for e in ctx.events if "carved" in e.get("message", "")] == [ctx.calibration_split["message"]]
    again = digits_mlp.context(tmp_path / "again", spec)  # the same seed carves the same rows
    same = again.dataset("calibration", again.load_model("input"))
    assert same is not None and {r.tobytes() for r in same.inputs["pixels"]} == cal_rows
    with_train = spec.model_copy(update={"data": spec.data.model_copy(update={"train": "ds_train"})})
    given = digits_mlp.context(tmp_path / "given", with_train)  # train data calibrates: eval stays whole
    assert len(given.dataset("eval", model) or []) == 540 and given.dataset_ref("calibration") == "ds_train"
    assert given.calibration_split is None


def test_models_load_by_id_and_data_once_per_interface(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    ctx = _local(tmp_path, digits_mlp, {"eval": "ds_eval"})
    model = ctx.load_model("input")
    assert model.form == "onnx" and model.input_names == ["pixels"]
    evil = ctx.load_model("../../evil")  # a client-supplied id never becomes a path as it is
    assert evil.onnx_path is not None and (tmp_path / "work" / "models") in evil.onnx_path.parents
    first = ctx.dataset("eval", model)
    assert first is not None and len(first) == 540 and first.labels is not None
    assert ctx.dataset("eval", model) is first
    with pytest.raises(KeyError, match="unknown model"):
        ctx.load_model("mdl_other")


def test_events_and_cancellation(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    ctx = _local(tmp_path, digits_mlp, {})
    ctx.begin_step(1, 3, "quantize (dynamic)")
    ctx.progress("calibrating", fraction=0.5)
    ctx.log("hello", n=1)
    kinds = [(e["kind"], e.get("label") or e.get("phase") or e.get("message")) for e in ctx.events]
    assert kinds == [("step", "quantize (dynamic)"), ("progress", "calibrating"), ("log", "hello")]
    assert ctx.events[1]["fraction"] == 0.5 and ctx.events[1]["epoch"] is None
    ctx.check_cancelled()
    ctx.cancelled = True
    with pytest.raises(JobCancelled):
        ctx.check_cancelled()


def _running_job() -> str:
    model_id = insert_model()
    with session_scope() as s:
        j = Job(id=new_id("job"), owner="local", status="running", spec={"model": model_id}, model_id=model_id,
                queue="cpu", attempt=1, max_attempts=3, progress={})
        s.add(j)
        return j.id


def test_db_context_writes_progress_events_and_reads_the_cancel_flag(
    pg_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(context, "CANCEL_POLL_INTERVAL_S", 0.0)
    job_id = _running_job()
    ctx = DBContext(Claim(job_id, 1), tmp_path, _spec({}), models={})
    ctx.begin_step(1, 4, "finetune (full)")
    ctx.progress("training epoch 1/2", fraction=0.5, epoch=1, epochs=2, metrics={"loss": 0.25, "accuracy": 0.93125})
    ctx.log("note", k="v")
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.phase == "training epoch 1/2"
        assert job.progress == {"step": 2, "steps": 4, "percent": 37.5, "epoch": 1, "epochs": 2,
                                "metrics": {"loss": 0.25, "accuracy": 0.93125}}
        events = [(e.kind, e.message) for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                                                         .order_by(JobEvent.id))]
    # the metric values are in the event's text (what `modelpress jobs logs` prints), not only in its data
    assert events == [("phase", "finetune (full)"), ("progress", "training epoch 1/2  loss=0.25 accuracy=0.9313"),
                      ("log", "note")]
    ctx.check_cancelled()
    with session_scope() as s:
        s.get(Job, job_id).cancel_requested = True  # type: ignore[union-attr]
    with pytest.raises(JobCancelled):
        ctx.check_cancelled()
    stale = DBContext(Claim(job_id, 0), tmp_path / "b", _spec({}), models={})  # an earlier attempt
    stale.begin_step(0, 4, "evaluate input")
    with session_scope() as s:
        assert s.get(Job, job_id).phase == "training epoch 1/2"  # type: ignore[union-attr]
