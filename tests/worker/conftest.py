"""Worker fixtures: the digits MLP trained once per test session, and its npz data sets."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from models.spec import JobSpec
from tests.factories import digits_split, train_digits_mlp_onnx, write_npz
from worker.context import LocalContext


@dataclass(frozen=True)
class DigitsFiles:
    """A trained digits MLP as ONNX and its train / eval npz files."""

    model: Path
    train: Path
    eval: Path
    torch_accuracy: float

    def context(self, workdir: Path, spec: JobSpec, cls: type[LocalContext] = LocalContext) -> LocalContext:
        """A CPU context serving the model as ``mdl_mlp`` and the data as ``ds_train`` / ``ds_eval``."""
        return cls(
            workdir,
            spec,
            models={"mdl_mlp": (self.model, "onnx", {})},
            datasets={"ds_train": (self.train, "npz", {}), "ds_eval": (self.eval, "npz", {})},
            device="cpu",
        )


@pytest.fixture(scope="session")
def digits_mlp(tmp_path_factory: pytest.TempPathFactory) -> DigitsFiles:
    """The digits MLP (ONNX, dynamic batch) with train/eval npz, built once per session."""
    root = tmp_path_factory.mktemp("digits")
    (x_tr, y_tr), (x_ev, y_ev) = digits_split()
    acc = train_digits_mlp_onnx(root / "upload" / "mlp.onnx")
    assert acc >= 0.9, f"the digits MLP trained to only {acc:.3f}"
    return DigitsFiles(
        model=root / "upload" / "mlp.onnx",
        train=write_npz(root / "train.npz", x_tr, y_tr),
        eval=write_npz(root / "eval.npz", x_ev, y_ev),
        torch_accuracy=acc,
    )


class LoopingContext(LocalContext):
    """A LocalContext that can cancel its job a while after the calibration data is first read, noting the
    thread that saw the cancel first (``ort-watchdog``: the flag stopped a run from inside)."""

    cancel_after_s: float | None = None
    cancel_after_first_check_s: float | None = None  # or that long after the first cancel check
    cancel_at: float | None = None
    seen_by: list[str]

    def dataset(self, role: Any, model: Any) -> Any:
        if role == "calibration" and self.cancel_after_s is not None and self.cancel_at is None:
            self.cancel_at = time.monotonic() + self.cancel_after_s
        return super().dataset(role, model)

    def check_cancelled(self) -> None:
        if self.cancel_at is None and self.cancel_after_first_check_s is not None:
            self.cancel_at = time.monotonic() + self.cancel_after_first_check_s
        if self.cancel_at is not None and time.monotonic() >= self.cancel_at:
            self.cancelled = True
        if self.cancelled:
            self.seen_by.append(threading.current_thread().name)
        super().check_cancelled()


def looping_context(workdir: Path, spec: dict[str, object] | None = None,
                    cancel_after_s: float | None = None) -> LoopingContext:
    """A context whose input model ``mdl_loop`` loops 2**40 times in every run (a computed trip count, which
    the upload check cannot read), with 8 samples as train, eval and calibration data; ``cancel_after_s``:
    cancelled that long after the calibration data is read (the watchdog polls every 0.2 s)."""
    import numpy as np
    import onnx

    from tests.factories_onnx import INPUT, looping_model

    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir.parent / "loop.onnx"
    onnx.save(looping_model(2**40, constant=False), model)
    data = write_npz(workdir.parent / "loop.npz", np.ones((8, 4), np.float32), np.zeros(8, np.int64), INPUT)
    roles = {"train": "ds_loop", "eval": "ds_loop", "calibration": "ds_loop"}
    job = JobSpec.model_validate({"model": "mdl_loop", "task": "image-classification", "data": roles, **(spec or {})})
    ctx = LoopingContext(workdir, job, models={"mdl_loop": (model, "onnx", {})},
                         datasets={"ds_loop": (data, "npz", {})}, device="cpu")
    ctx.cancel_after_s, ctx.seen_by = cancel_after_s, []
    return ctx


class CancelFlag:
    """A ``check_cancelled`` that raises JobCancelled once set (``set_in(s)``: that many seconds from now),
    noting the threads that saw it (``ort-watchdog``: the flag stopped a run from inside)."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.after_first_check_s: float | None = None
        self.seen_by: list[str] = []

    def set_in(self, seconds: float) -> CancelFlag:
        self.at = time.monotonic() + seconds
        return self

    def set_after_first_check(self, seconds: float) -> CancelFlag:
        """Set ``seconds`` after the first check (the work has begun: imports and loading are behind it)."""
        self.after_first_check_s = seconds
        return self

    def __call__(self) -> None:
        from worker.core import JobCancelled

        if self.at is None and self.after_first_check_s is not None:
            self.at = time.monotonic() + self.after_first_check_s
        if self.at is not None and time.monotonic() >= self.at:
            self.seen_by.append(threading.current_thread().name)
            raise JobCancelled()


@pytest.fixture
def fast_cancel_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run watchdog reads the cancel flag every 0.2 s."""
    monkeypatch.setattr("worker.ort_guard.CANCEL_POLL_S", 0.2)


@pytest.fixture
def run_cap_1s(monkeypatch: pytest.MonkeyPatch) -> Iterator[float]:
    """MODELPRESS_RUN_MAX_S=1 for the test: one ORT run of a model may take at most 1 s."""
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_RUN_MAX_S", "1")
    get_settings.cache_clear()
    yield 1.0
    monkeypatch.delenv("MODELPRESS_RUN_MAX_S")
    get_settings.cache_clear()


@pytest.fixture
def unqueued_api(pg_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The API on the test database; accepted jobs are recorded, not sent to a broker (the test executes them)."""
    from fastapi.testclient import TestClient

    import worker.celery_app
    from api.main import create_app

    monkeypatch.setattr(worker.celery_app, "enqueue_job", lambda job_id, queue: None)
    with TestClient(create_app(), raise_server_exceptions=False) as c:
        yield c
