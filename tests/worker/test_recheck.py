"""A 'slower than input' warning is confirmed by timing both models again, interleaved, before it is given."""

from __future__ import annotations

from pathlib import Path

from models.report_view import regressions
from models.spec import JobSpec
from tests.worker.conftest import DigitsFiles
from worker import recheck


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
