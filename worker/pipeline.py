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
from models.spec import LM_TASKS, step_label
from worker import recheck
from worker.passes.base import JobCancelled, Pass, StepFailed, WorkingModel

if TYPE_CHECKING:
    from models.spec import JobSpec
    from worker.evaluate import Evaluation
    from worker.passes.base import PipelineContext
    from worker.stage_cache import StageCache

T = TypeVar("T")
# Keys of an evaluation kept in a step's after-step measurement (ONNX form).
_STEP_EVAL_KEYS = ("accuracy", "metric", "fidelity", "size_bytes", "params", "macs", "num_samples")
# ... and for causal LMs.
_LM_STEP_EVAL_KEYS = ("accuracy", "metric", "perplexity", "nll", "tokens", "agreement", "size_bytes", "params",
                      "num_samples")


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
        raise StepError(step, "step_failed", f"{type(e).__name__}: {e}") from e


def pass_for(step_type: str) -> Pass:
    """A fresh instance of the pass registered for ``step_type``."""
    from worker.passes import load_passes

    return load_passes()[step_type]()


def is_lm(spec: JobSpec, model: WorkingModel) -> bool:
    """Whether the job works on a decoder-only LM (task ``text-generation`` or an hf causal LM)."""
    from worker.convert import is_causal_lm

    return spec.task in LM_TASKS or is_causal_lm(model)


def _to_form(model: WorkingModel, form: str, ctx: PipelineContext, opset: int, name: str) -> WorkingModel:
    if model.form == form:
        return model
    from worker import convert

    if form == "torch" and is_lm(ctx.spec, model):
        raise StepFailed(
            "unsupported_model",
            "this step needs the causal LM in torch form, but it is already ONNX (a KV-cache graph cannot be "
            "made trainable again): put prune, finetune, distill and export before quantize",
        )

    if form == "onnx":
        return convert.to_onnx(model, ctx, opset, name=name)
    return convert.to_torch(model, ctx)


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def _measure_after_step(
    model: WorkingModel, ctx: PipelineContext, spec: JobSpec, reference: dict[str, Any] | None
) -> dict[str, Any]:
    """The task metric right after a step, on the eval data (no latency)."""
    data = ctx.dataset("eval", model)
    if data is None:
        return {"measured": False, "reason": "no eval dataset"}
    if is_lm(spec, model):
        if model.form == "onnx" and model.onnx_path is not None:
            ev = _evaluate(model, ctx, spec, reference, latency=False)
            return {"measured": True, **{k: ev[k] for k in _LM_STEP_EVAL_KEYS if k in ev}}
        from worker.lm.evaluate import torch_perplexity

        return {"measured": True, **torch_perplexity(model, data.take(spec.evaluate.max_samples),
                                                     check_cancelled=ctx.check_cancelled)}
    if model.form == "onnx" and model.onnx_path is not None:
        from worker.evaluate import evaluate

        ev = evaluate(model.onnx_path, data, spec.evaluate, spec.task, reference, latency=False,
                      check_cancelled=ctx.check_cancelled)
        return {"measured": True, **{k: ev[k] for k in _STEP_EVAL_KEYS if k in ev}}
    from worker.metrics import torch_metric

    data = data.take(spec.evaluate.max_samples)  # the samples the baseline's reference outputs cover
    primary = None if reference is None else next(iter(reference.values()), None)
    return {"measured": True, **torch_metric(model, data, spec, reference=primary)}


def _metric_value(ev: dict[str, Any]) -> float | None:
    metric = ev.get("metric") or {}
    value = metric.get("value")
    return None if value is None else float(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


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


def _lm_budget(spec: JobSpec, baseline: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
    """Causal LMs: the relative perplexity increase against ``max_perplexity_increase`` and the choice
    accuracy drop against ``max_accuracy_drop``; ``met`` only when every given bound holds."""
    cfg = spec.evaluate
    in_ppl, out_ppl = baseline.get("perplexity"), output.get("perplexity")
    in_acc, out_acc = baseline.get("accuracy"), output.get("accuracy")
    increase = None if not in_ppl or out_ppl is None else float(out_ppl) / float(in_ppl) - 1.0
    drop = None if in_acc is None or out_acc is None else float(in_acc) - float(out_acc)
    budget: dict[str, Any] = {
        "max_accuracy_drop": cfg.max_accuracy_drop,
        "max_perplexity_increase": cfg.max_perplexity_increase,
        "metric": (baseline.get("metric") or {}).get("name"),
        "accuracy_drop": drop,
        "perplexity_increase": increase,
        "met": True,
    }
    missed: list[str] = []
    if cfg.max_perplexity_increase is not None:
        if increase is None:
            missed.append("perplexity could not be measured (no eval text)")
        elif increase > cfg.max_perplexity_increase + 1e-12:
            missed.append(f"perplexity rose {increase * 100:.2f}% ({in_ppl:.4g} -> {out_ppl:.4g}; "
                          f"allowed {cfg.max_perplexity_increase * 100:.2f}%)")
    if cfg.max_accuracy_drop is not None:
        if drop is None:
            missed.append("choice accuracy could not be measured (no eval rows with evaluate.choices)")
        elif drop > cfg.max_accuracy_drop + 1e-12:
            missed.append(f"choice accuracy fell {drop * 100:.2f} points (allowed {cfg.max_accuracy_drop * 100:.2f})")
    if missed:
        budget["met"] = False
        budget["reason"] = "; ".join(missed)
    return budget


def _lm_gains(baseline: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
    def tps(ev: dict[str, Any]) -> float | None:
        return (ev.get("decode") or {}).get("tokens_per_s")

    return {
        "decode_speedup": _ratio(tps(output), tps(baseline)),
        "perplexity_ratio": _ratio(output.get("perplexity"), baseline.get("perplexity")),
        "memory_ratio": _ratio(baseline.get("peak_memory_bytes"), output.get("peak_memory_bytes")),
    }


def build_report(
    spec: JobSpec, baseline: dict[str, Any], output: dict[str, Any], steps: list[dict[str, Any]], device: str
) -> dict[str, Any]:
    """The job report: input and output evaluations, per-step entries, gains and the accuracy budget."""
    in_metric, out_metric = _metric_value(baseline), _metric_value(output)
    in_acc, out_acc = baseline.get("accuracy"), output.get("accuracy")
    drop = None if in_metric is None or out_metric is None else in_metric - out_metric
    lm = spec.task in LM_TASKS
    max_drop = spec.evaluate.max_accuracy_drop
    budget: dict[str, Any] = {
        "max_accuracy_drop": max_drop,
        "metric": (baseline.get("metric") or {}).get("name"),
        "accuracy_drop": drop,
        "met": True,
    }
    if max_drop is not None:
        if drop is None:
            budget["met"] = False
            budget["reason"] = "the metric could not be measured (no eval data or no labels)"
        else:
            budget["met"] = bool(drop <= max_drop + 1e-12)
    if lm:
        budget = _lm_budget(spec, baseline, output)
    report: dict[str, Any] = {
        "task": spec.task,
        "pipeline": [s["label"] for s in steps],
        "input": baseline,
        "output": output,
        "steps": steps,
        "fidelity": output.get("fidelity"),
        "gains": {
            "size_ratio": _ratio(baseline.get("size_bytes"), output.get("size_bytes")),
            "latency_ratio": _ratio(_latency(baseline), _latency(output)),
            "params_ratio": _ratio(baseline.get("params"), output.get("params")),
            "macs_ratio": _ratio(baseline.get("macs"), output.get("macs")),
            "accuracy_delta": None if in_acc is None or out_acc is None else out_acc - in_acc,
            "metric_delta": None if in_metric is None or out_metric is None else out_metric - in_metric,
        },
        "budget": budget,
        # Computed once here, beside the gains: the API, the pages and the CLI read these back.
        "warnings": regressions(baseline, output),
        "environment": _environment(spec, device),
    }
    if lm:
        report["gains"].update(_lm_gains(baseline, output))
        report["fidelity"] = output.get("agreement")
    return report


def _evaluate(
    model: WorkingModel, ctx: PipelineContext, spec: JobSpec, reference: dict[str, Any] | None,
    latency: bool | None = None,
) -> Evaluation:
    assert model.onnx_path is not None
    data = ctx.dataset("eval", model)
    if is_lm(spec, model):
        from worker.lm.evaluate import evaluate_lm
        from worker.lm.export import LMLayout

        train = ctx.dataset("train", model) if spec.evaluate.few_shot else None
        layout = LMLayout.from_meta(model.meta["lm"]) if "lm" in model.meta else None
        return evaluate_lm(model.onnx_path, data, spec.evaluate, reference, hf_dir=model.hf_dir, train=train,
                           layout=layout, latency=latency, check_cancelled=ctx.check_cancelled)
    from worker.evaluate import evaluate

    return evaluate(model.onnx_path, data, spec.evaluate, spec.task, reference, latency=latency,
                    check_cancelled=ctx.check_cancelled)


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
        baseline_onnx = _to_form(model, "onnx", ctx, opset, "input")
        baseline, wall = _timed(lambda: _evaluate(baseline_onnx, ctx, spec, None))
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
            model = _to_form(model, p.takes, ctx, opset, f"step{i}")
            t0 = time.perf_counter()
            result = p.run(model, step, ctx)
            wall = time.perf_counter() - t0
            model = result.model
            ctx.check_cancelled()
            # The last step's ONNX output is the job's output: its full evaluation below serves here too.
            last_onnx = i == len(spec.steps) - 1 and model.form == "onnx"
            after = {} if last_onnx else _measure_after_step(model, ctx, spec, reference)
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
        if not spec.steps and is_lm(spec, model):
            model = baseline_onnx  # nothing changed the LM: its (costly, parity-checked) export is the output
        model = _to_form(model, "onnx", ctx, opset, "output")
    assert model.onnx_path is not None
    with _stage("evaluate output"):
        output, wall = _timed(lambda: _evaluate(model, ctx, spec, reference))
    output_report = {**output, "wall_s": wall}
    recheck.confirm_regressions(spec, baseline_onnx, model, baseline_report, output_report, ctx, is_lm(spec, model))
    keys = _LM_STEP_EVAL_KEYS if is_lm(spec, model) else _STEP_EVAL_KEYS
    if steps and not steps[-1]["eval"]:
        steps[-1]["eval"] = {"measured": True, **{k: output[k] for k in keys if k in output}}
        if cache is not None:
            cache.finish(steps)

    report = build_report(spec, baseline_report, output_report, steps, ctx.device)
    out_path = Path(model.onnx_path)
    # Weights over 2 GB live beside the file (worker.lm.export); the job stores them in model.zip with it.
    data_file = out_path.with_name(out_path.name + ".data")
    files = {"model.onnx.data": data_file} if out_path.name == "model.onnx" and data_file.is_file() else {}
    return PipelineResult(output_path=out_path, report=report, files=files)
