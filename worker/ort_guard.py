"""Bounded, cancellable ONNX Runtime runs of an uploaded graph (evaluation, calibration, parity checks).

A graph can loop for as long as it likes inside one ``session.run`` (an ONNX ``Loop`` with a huge trip
count), where no cancel check between runs is ever reached. Every run made through a :class:`RunGuard`
carries a ``RunOptions`` whose ``terminate`` flag a watchdog thread sets when

- the job's cancel flag is seen (the context's ``check_cancelled``, polled every ``POLL_S``): the run ends
  with ``JobCancelled``;
- the run passes its time budget: ``min(RUN_MAX_S, what is left of PHASE_MAX_S)``, and, once one run was
  measured, ``RUN_COST_FACTOR`` times the measured cost per sample of the runs so far (never under
  ``RUN_MIN_BUDGET_S``): the run ends with ``StepFailed("run_time_limit")``.

ONNX Runtime checks the flag between nodes and between a Loop's iterations, so a run stops within
milliseconds of it being set. Code that runs a session it does not own (ORT's calibrators) gets a
:class:`GuardedSession` in its place. One guard serves one phase: an evaluation, a calibration, the
auto_exclude sensitivity rounds, a latency recheck.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnxruntime as ort

POLL_S = 0.25
CANCEL_POLL_S = 1.0
RUN_COST_FACTOR = 50.0  # a run may take this many times the per-sample cost measured so far (x its rows)
RUN_MIN_BUDGET_S = 10.0  # ... but never less than this (timer noise, a cold first batch)


def _never() -> None:
    """The default cancel check: never cancelled."""


class RunGuard:
    """Runs ``session.run`` under a time budget and the job's cancel flag (see the module docstring).

    Use it as a context manager: one watchdog thread serves every run made inside the block."""

    def __init__(
        self,
        check_cancelled: Callable[[], None] = _never,
        run_max_s: float | None = None,
        phase_max_s: float | None = None,
        what: str = "the model",
    ) -> None:
        if run_max_s is None or phase_max_s is None:
            from models.settings import get_settings

            settings = get_settings()
            run_max_s = settings.run_max_s if run_max_s is None else run_max_s
            phase_max_s = settings.eval_phase_max_s if phase_max_s is None else phase_max_s
        self.check_cancelled = check_cancelled
        self.run_max_s = run_max_s
        self.phase_max_s = phase_max_s
        self.phase_deadline = time.monotonic() + phase_max_s
        self.what = what
        self.per_sample_s: float | None = None  # the slowest measured cost per sample so far
        self._lock = threading.Lock()
        self._current: tuple[ort.RunOptions, float] | None = None  # the running run's options and deadline
        self._why: BaseException | None = None  # why the watchdog stopped the current run
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunGuard:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the watchdog thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def budget(self, rows: int) -> float:
        """Seconds the next run of ``rows`` samples may take."""
        budget = min(self.run_max_s, max(0.0, self.phase_deadline - time.monotonic()))
        if self.per_sample_s is not None:
            budget = min(budget, max(RUN_MIN_BUDGET_S, RUN_COST_FACTOR * self.per_sample_s * max(1, rows)))
        return budget

    def run(self, session: ort.InferenceSession, names: Sequence[str] | None, feed: dict[str, Any],
            rows: int | None = None) -> list[Any]:
        """``session.run(names, feed)``, ended early by a cancel (JobCancelled) or past its budget
        (StepFailed ``run_time_limit``); ``rows``: the samples the run's cost is counted in (default: the
        feed's batch size; a causal LM counts tokens)."""
        import onnxruntime as ort

        from worker.core import JobCancelled, StepFailed

        rows = _rows(feed) if rows is None else rows
        budget = self.budget(rows)
        if budget <= 0:
            raise StepFailed("run_time_limit", f"running {self.what} took more than the {self.phase_max_s:g} s "
                                               "allowed for one phase (evaluation, calibration, parity check: "
                                               "MODELPRESS_EVAL_PHASE_MAX_S)")
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._watch, name="ort-watchdog", daemon=True)
            self._thread.start()
        options = ort.RunOptions()
        started = time.monotonic()
        with self._lock:
            self._current, self._why = (options, started + budget), None
        try:
            out = session.run(list(names) if names is not None else None, feed, options)
        except Exception as exc:
            with self._lock:
                self._current, why = None, self._why
            if isinstance(why, JobCancelled):
                raise why from None
            if why is not None:
                raise StepFailed("run_time_limit", self._too_long(budget)) from exc
            raise
        with self._lock:
            self._current, why = None, self._why
        if isinstance(why, JobCancelled):  # the flag came as the run finished: still a cancel
            raise why
        cost = (time.monotonic() - started) / max(1, rows)
        self.per_sample_s = cost if self.per_sample_s is None else max(self.per_sample_s, cost)
        return list(out)

    def _too_long(self, budget: float) -> str:
        return (f"one run of {self.what} took longer than {budget:.1f} s and was stopped (the limit is the "
                f"smaller of MODELPRESS_RUN_MAX_S={self.run_max_s:g} s, {RUN_COST_FACTOR:g}x its measured cost "
                f"and what is left of MODELPRESS_EVAL_PHASE_MAX_S={self.phase_max_s:g} s): does its graph loop "
                "(an ONNX Loop with a huge trip count)?")

    def _stop_current(self, options: ort.RunOptions, why: BaseException) -> None:
        with self._lock:
            if self._current is not None and self._current[0] is options and self._why is None:
                self._why = why
                options.terminate = True

    def _watch(self) -> None:
        from worker.core import JobCancelled

        next_cancel_check = time.monotonic() + CANCEL_POLL_S
        while not self._stop.wait(POLL_S):
            with self._lock:
                current = self._current
            if current is None:
                continue
            now = time.monotonic()
            if now >= current[1]:
                self._stop_current(current[0], TimeoutError())
            elif now >= next_cancel_check:
                next_cancel_check = now + CANCEL_POLL_S
                try:
                    self.check_cancelled()
                except JobCancelled as exc:
                    self._stop_current(current[0], exc)
                except Exception:  # a failed flag read (database restarting) is not a cancel: read it again
                    continue


class GuardedSession:
    """An ORT session whose ``run`` goes through ``guard`` (every other attribute is the session's): what
    code that runs a session it made itself (ORT's calibrators) is given in its place."""

    def __init__(self, session: ort.InferenceSession, guard: RunGuard) -> None:
        self._session, self._guard = session, guard

    def run(self, output_names: Sequence[str] | None, input_feed: dict[str, Any], run_options: Any = None) -> list[Any]:
        """``session.run`` under the guard (its own RunOptions: ``run_options`` is not used)."""
        return self._guard.run(self._session, output_names, input_feed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def _rows(feed: dict[str, Any]) -> int:
    for value in feed.values():
        shape = getattr(value, "shape", None)
        if shape:
            return int(shape[0])
    return 1
