"""What a job's run shares, in memory (``worker.pipeline``) or streamed (``worker.stream_job``): the result
type, the stage wrapper that names a failure, and the report."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from models.report_view import regressions
from storage.base import is_full
from worker.core import JobCancelled, StepFailed
from worker.families import Family, family_for, metric_value, ratio

if TYPE_CHECKING:
    from models.spec import JobSpec

T = TypeVar("T")


@dataclass
class PipelineResult:
    """The final ONNX model, the report (JSON-safe; the runner stores it), and extra artifact files by name."""

    output_path: Path
    report: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


class StepError(Exception):
    """A pipeline stage failed: ``step`` names it (e.g. ``steps[1] quantize``), ``code``/``message`` say why."""

    def __init__(self, step: str, code: str, message: str) -> None:
        super().__init__(f"{step}: [{code}] {message}")
        self.step = step
        self.code = code
        self.message = message


@contextmanager
def stage(step: str) -> Iterator[None]:
    """Wrap any failure inside as a StepError naming ``step`` (JobCancelled passes through)."""
    try:
        yield
    except (JobCancelled, StepError):
        raise
    except StepFailed as e:
        raise StepError(step, e.code, e.message) from e
    except Exception as e:
        if is_full(e):  # no space for a work file (or the database): waiting or retrying the step cannot help
            raise StepError(step, "storage_full", f"{type(e).__name__}: {e}") from e
        raise StepError(step, "step_failed", f"{type(e).__name__}: {e}") from e


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def _latency(ev: dict[str, Any]) -> float | None:
    lat = ev.get("latency_ms")
    return None if not lat else lat.get("median")


def _environment(spec: JobSpec, device: str) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    from worker.evaluate import cpu_model

    return {
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "execution_provider": spec.evaluate.latency.provider,
        "threads": spec.evaluate.latency.threads,
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def build_report(
    spec: JobSpec, baseline: dict[str, Any], output: dict[str, Any], steps: list[dict[str, Any]], device: str,
    family: Family | None = None,
) -> dict[str, Any]:
    """The job report: input and output evaluations, per-step entries, gains and the quality budget
    (``family``'s; by default the family of the spec's task).

    Its shape is ``models.report.Report``, which the search, the pages and the CLI read it with."""
    family = family or family_for(spec.task)
    budget = family.budget(spec, baseline, output)
    if output.get("tasks"):  # a multi-task model: the budget holds on every task
        from worker.task_eval import budget as task_budget

        budget = task_budget(spec, budget, output["tasks"], steps)
    in_metric, out_metric = metric_value(baseline), metric_value(output)
    in_acc, out_acc = baseline.get("accuracy"), output.get("accuracy")
    report: dict[str, Any] = {
        "task": spec.task,
        "pipeline": [s["label"] for s in steps],
        "input": baseline,
        "output": output,
        "steps": steps,
        "fidelity": family.headline(output),
        "gains": {
            "size_ratio": ratio(baseline.get("size_bytes"), output.get("size_bytes")),
            "latency_ratio": ratio(_latency(baseline), _latency(output)),
            "params_ratio": ratio(baseline.get("params"), output.get("params")),
            "macs_ratio": ratio(baseline.get("macs"), output.get("macs")),
            "accuracy_delta": None if in_acc is None or out_acc is None else out_acc - in_acc,
            "metric_delta": None if in_metric is None or out_metric is None else out_metric - in_metric,
            **family.gains(baseline, output),
        },
        "budget": budget,
        # Computed once here, beside the gains: the API, the pages and the CLI read these back.
        "warnings": regressions(baseline, output),
        "environment": _environment(spec, device),
    }
    return report
