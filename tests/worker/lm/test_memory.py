"""worker.lm.memory: the peak-memory probe runs the uploaded graph again in a child process, so a graph that
loops fails run_time_limit there too, and a cancel kills the child within seconds."""

from __future__ import annotations

import time
from pathlib import Path

import onnx
import psutil
import pytest

from tests.factories_onnx import looping_lm
from tests.worker.conftest import CancelFlag
from worker.core import JobCancelled, StepFailed
from worker.lm.memory import session_peak_bytes


def _probes() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "worker.lm.memory" in " ".join(p.cmdline())]


@pytest.fixture
def looping(tmp_path: Path) -> Path:
    path = tmp_path / "loop.onnx"
    onnx.save(looping_lm(), path)
    return path


def test_a_cancel_kills_the_probe_of_a_looping_lm_within_seconds(looping: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("worker.lm.memory.CANCEL_POLL_S", 0.2)
    cancel = CancelFlag().set_in(3.0)  # the child is started and inside its looping run by then
    with pytest.raises(JobCancelled):
        session_peak_bytes(looping, 1, None, 4, 2, cancel)
    assert cancel.at is not None and time.monotonic() - cancel.at <= 10 and _probes() == []


def test_the_probe_of_a_looping_lm_fails_with_run_time_limit_past_the_cap(looping: Path, run_cap_1s: float) -> None:
    started = time.monotonic()
    with pytest.raises(StepFailed) as failed:
        session_peak_bytes(looping, 1, None, 4, 2)
    assert failed.value.code == "run_time_limit" and "MODELPRESS_RUN_MAX_S=1 s" in failed.value.message
    assert time.monotonic() - started < 30 and _probes() == []  # the child's start (imports) included
