"""The pure pipeline: spec + context -> final ONNX model + report. No DB, no Celery.

Baseline evaluation of the input model, each step (converting the working model to the form its
pass takes, measuring the task metric right after it), export to ONNX, evaluation of the output with
the same harness and the baseline's outputs as reference, then gains and the accuracy budget.
"""

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
from models.spec import step_label
from storage.base import is_full
from worker.core import JobCancelled, StepFailed, WorkingModel
from worker.families import Family, family_for, metric_value, ratio
from worker.passes.base import Pass

if TYPE_CHECKING:
    from models.spec import JobSpec
    from worker.core import PipelineContext
    from worker.stage_cache.prefix import StageCache

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
def _stage(step: str) -> Iterator[None]:
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


def pass_for(step_type: str) -> Pass:
    """A fresh instance of the pass registered for ``step_type``."""
    from worker.passes import load_passes

    return load_passes()[step_type]()


def _to_form(model: WorkingModel, form: str, ctx: PipelineContext, opset: int, name: str,
             family: Family) -> WorkingModel:
    if model.form == form:
        return model
    from worker import convert

    family.check_form(model, form)
    if form == "onnx":
        return convert.to_onnx(model, ctx, opset, name=name)
    return convert.to_torch(model, ctx)


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
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
        "budget": family.budget(spec, baseline, output),
        # Computed once here, beside the gains: the API, the pages and the CLI read these back.
        "warnings": regressions(baseline, output),
        "environment": _environment(spec, device),
    }
    return report


def run(spec: JobSpec, ctx: PipelineContext, cache: StageCache | None = None) -> PipelineResult:
    """Run the whole job: baseline, steps, export, output evaluation; the report says what it gained.

    With a ``cache``, the longest cached prefix of the steps is reused (its passes do not run) and each
    step's output is stored for later jobs."""
    total = len(spec.steps) + 2
    opset = spec.export.opset

    ctx.check_cancelled()
    ctx.begin_step(0, total, "evaluate input")
    with _stage("evaluate input"):
        model = ctx.load_model("input")
        family = family_for(spec.task, model)  # chosen once: classifier, embedding or causal LM
        baseline_onnx = _to_form(model, "onnx", ctx, opset, "input", family)
        baseline, wall = _timed(lambda: family.evaluate(baseline_onnx, ctx, spec, None))
        baseline_report = {**baseline, "wall_s": wall}
    reference = baseline.outputs

    steps: list[dict[str, Any]] = []
    resumed = cache.resume(ctx, model) if cache is not None else None
    if resumed is not None:
        model, steps = resumed.model, resumed.entries
    for i, step in enumerate(spec.steps):
        if i < len(steps):
            continue  # from the stage cache
        ctx.check_cancelled()
        label = step_label(step)
        ctx.begin_step(i + 1, total, label)
        with _stage(f"steps[{i}] {step.type}"):
            p = pass_for(step.type)
            model = _to_form(model, p.takes, ctx, opset, f"step{i}", family)
            t0 = time.perf_counter()
            result = p.run(model, step, ctx)
            wall = time.perf_counter() - t0
            model = result.model
            ctx.check_cancelled()
            # The last step's ONNX output is the job's output: its full evaluation below serves here too.
            last_onnx = i == len(spec.steps) - 1 and model.form == "onnx"
            after = {} if last_onnx else family.measure_after_step(model, ctx, spec, reference)
        steps.append(
            {
                "index": i,
                "type": step.type,
                "label": label,
                "wall_s": wall,
                "metrics": result.metrics,
                "eval": after,
                "curve": result.curve,
            }
        )
        ctx.log(f"step {label} done", wall_s=wall, eval=after)
        if cache is not None:
            cache.store(i, model, ctx, steps)

    ctx.check_cancelled()
    ctx.begin_step(total - 1, total, "export + evaluate output")
    with _stage("export"):
        if not spec.steps and family.reuses_input_export:
            model = baseline_onnx  # nothing changed the model: its (costly, parity-checked) export is the output
        model = _to_form(model, "onnx", ctx, opset, "output", family)
    assert model.onnx_path is not None
    with _stage("evaluate output"):
        output, wall = _timed(lambda: family.evaluate(model, ctx, spec, reference))
    output_report = {**output, "wall_s": wall}
    if steps and not steps[-1]["eval"]:
        steps[-1]["eval"] = {"measured": True, **{k: output[k] for k in family.step_eval_keys if k in output}}
        if cache is not None:
            cache.finish(steps)

    report = build_report(spec, baseline_report, output_report, steps, ctx.device, family)
    out_path = Path(model.onnx_path)
    # Weights over 2 GB live beside the file (worker.lm.export); the job stores them in model.zip with it.
    data_file = out_path.with_name(out_path.name + ".data")
    files = {"model.onnx.data": data_file} if out_path.name == "model.onnx" and data_file.is_file() else {}
    return PipelineResult(output_path=out_path, report=report, files=files)
