"""A 'slower than input' warning is confirmed by timing both models again, interleaved, before it is given."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import onnx
import pytest

from models.report_view import regressions
from models.spec import JobSpec
from tests.factories_onnx import looping_lm
from tests.worker.conftest import DigitsFiles, looping_context
from worker import recheck
from worker.core import JobCancelled, StepFailed, WorkingModel


def _spec() -> JobSpec:
    return JobSpec.model_validate({"model": "mdl_mlp", "task": "image-classification", "data": {"eval": "ds_eval"},
                                   "steps": [], "evaluate": {"latency": {"warmup": 2, "runs": 20, "batch_size": 4}}})


def test_a_slowdown_that_was_noise_is_not_warned_after_the_interleaved_recheck(
    tmp_path: Path, digits_mlp: DigitsFiles
) -> None:
    spec = _spec()
    ctx = digits_mlp.context(tmp_path / "work", spec)
    model = ctx.load_model("input")
    # The same file on both sides, but a first measurement that (by noise) read the output 3x slower.
    baseline = {"latency_ms": {"median": 0.1, "p90": 0.11}}
    output = {"latency_ms": {"median": 0.3, "p90": 0.33}}
    assert [w["code"] for w in regressions(baseline, output)] == ["slower_than_input"]
    recheck.confirm_regressions(spec, model, model, baseline, output, ctx, lm=False)
    b, a = baseline["latency_recheck"], output["latency_recheck"]
    assert b["rounds"] == a["rounds"] == recheck.ROUNDS and 0 < b["median"] <= b["p90"]
    assert 0.5 < a["median"] / b["median"] < 2.0
    assert regressions(baseline, output) == []  # same model: within the measured spread
    assert any("timing both again, interleaved" in e["message"] for e in ctx.events if e["kind"] == "log")


def test_nothing_is_re_timed_when_nothing_looks_slower(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    spec = _spec()
    ctx = digits_mlp.context(tmp_path / "work", spec)
    model = ctx.load_model("input")
    baseline, output = {"latency_ms": {"median": 0.3, "p90": 0.4}}, {"latency_ms": {"median": 0.1, "p90": 0.2}}
    recheck.confirm_regressions(spec, model, model, baseline, output, ctx, lm=False)
    assert "latency_recheck" not in baseline and "latency_recheck" not in output


SLOWER = ({"latency_ms": {"median": 0.1, "p90": 0.11}}, {"latency_ms": {"median": 0.3, "p90": 0.33}})


@pytest.mark.usefixtures("fast_cancel_poll")
def test_the_recheck_of_a_looping_graph_ends_at_a_cancel_within_seconds(tmp_path: Path) -> None:
    ctx = looping_context(tmp_path / "work")
    model = ctx.load_model("input")
    ctx.cancel_after_first_check_s = 1.0  # the first check comes just before the first run
    with pytest.raises(JobCancelled):
        recheck.confirm_regressions(ctx.spec, model, model, *copy.deepcopy(SLOWER), ctx, lm=False)
    assert ctx.cancel_at is not None and time.monotonic() - ctx.cancel_at <= 10 and ctx.seen_by[0] == "ort-watchdog"


def test_the_lm_recheck_of_a_looping_graph_fails_with_run_time_limit_past_the_cap(
    tmp_path: Path, run_cap_1s: float
) -> None:
    ctx = looping_context(tmp_path / "work")
    path = tmp_path / "lm.onnx"
    onnx.save(looping_lm(), path)
    lm = WorkingModel("onnx", "onnx", ["input_ids", "attention_mask"], ["logits"], onnx_path=path)
    started = time.monotonic()
    with pytest.raises(StepFailed) as failed:
        recheck.confirm_regressions(ctx.spec, lm, lm, *copy.deepcopy(SLOWER), ctx, lm=True)
    assert failed.value.code == "run_time_limit" and "(latency recheck)" in failed.value.message
    assert time.monotonic() - started < 5
