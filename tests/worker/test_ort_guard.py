"""worker.ort_guard: an evaluation run of a graph that loops is stopped by a cancel or by its time budget."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from models.spec import EvaluateConfig
from tests.factories_onnx import INPUT, looping_model
from tests.worker.conftest import CancelFlag
from worker.core import ArrayDataset, JobCancelled, StepFailed
from worker.evaluate import evaluate, make_session
from worker.ort_guard import RunGuard

CFG = EvaluateConfig.model_validate({"latency": {"warmup": 1, "runs": 2, "batch_size": 1, "threads": 1}})


@pytest.fixture
def looping(tmp_path: Path) -> Path:
    path = tmp_path / "loop.onnx"
    onnx.save(looping_model(2**40, constant=False), path)
    return path


def _data() -> ArrayDataset:
    return ArrayDataset({INPUT: np.ones((4, 4), np.float32)}, np.zeros(4, np.int64))


def test_a_cancel_stops_a_run_that_loops(looping: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("worker.ort_guard.CANCEL_POLL_S", 0.2)
    cancel = CancelFlag().set_after_first_check(1.0)  # the first check comes just before the first run
    with pytest.raises(JobCancelled):
        evaluate(looping, _data(), CFG, "image-classification", check_cancelled=cancel)
    assert cancel.at is not None and time.monotonic() - cancel.at < 10  # the bound
    assert cancel.seen_by[0] == "ort-watchdog"  # the cancel stopped the looping run itself


def test_a_run_past_the_cap_fails_with_run_time_limit(looping: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPRESS_RUN_MAX_S", "1")
    from models.settings import get_settings

    get_settings.cache_clear()
    started = time.monotonic()
    with pytest.raises(StepFailed) as failed:
        evaluate(looping, _data(), CFG, "image-classification")
    get_settings.cache_clear()
    assert failed.value.code == "run_time_limit" and "MODELPRESS_RUN_MAX_S=1 s" in failed.value.message
    assert time.monotonic() - started < 5


def test_runs_are_bounded_by_their_measured_cost(tmp_path: Path) -> None:
    path = tmp_path / "short.onnx"
    onnx.save(looping_model(10, constant=False), path)
    session = make_session(path, 1)
    with RunGuard(run_max_s=100, phase_max_s=100) as guard:
        out = guard.run(session, None, {INPUT: np.ones((2, 4), np.float32)})
        assert out[0].shape == (2, 3) and guard.per_sample_s is not None
        assert guard.budget(2) == pytest.approx(10.0)  # 50x a tiny cost: the 10 s floor
    with RunGuard(run_max_s=100, phase_max_s=0.0) as spent, pytest.raises(StepFailed) as over:
        spent.run(session, None, {INPUT: np.ones((2, 4), np.float32)})
    assert over.value.code == "run_time_limit" and "MODELPRESS_EVAL_PHASE_MAX_S" in over.value.message
