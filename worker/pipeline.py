"""The pure pipeline: spec + context -> final ONNX model + report. No DB, no Celery.

Baseline evaluation of the input model, each step (converting the working model to the form its
pass takes, measuring the task metric right after it), export to ONNX, evaluation of the output with
the same harness and the baseline's outputs as reference, then gains and the accuracy budget.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.spec import ExportStep, step_label
from worker import recheck, task_eval
from worker.core import WorkingModel
from worker.families import Family, family_for
from worker.passes.base import Pass, PassResult
from worker.passes.export import ExportPass, export_metrics
from worker.stages import PipelineResult, build_report, timed
from worker.stages import stage as _stage

if TYPE_CHECKING:
    from models.spec import JobSpec
    from worker.core import PipelineContext
    from worker.stage_cache.prefix import StageCache


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


def run(spec: JobSpec, ctx: PipelineContext, cache: StageCache | None = None) -> PipelineResult:
    """Run the whole job: baseline, steps, export, output evaluation; the report says what it gained.

    With a ``cache``, the longest cached prefix of the steps is reused (its passes do not run) and each
    step's output is stored for later jobs."""
    from worker import stream_job

    streamed = stream_job.wanted(spec, ctx)  # an LLM too large to load: written layer by layer instead
    if streamed is not None:
        return stream_job.run(spec, ctx, *streamed)
    total = len(spec.steps) + 2
    opset = spec.export.opset

    ctx.check_cancelled()
    ctx.begin_step(0, total, "evaluate input")
    with _stage("evaluate input"):
        model = ctx.load_model("input")
        family = family_for(spec.task, model)  # chosen once: classifier, embedding or causal LM
        baseline_onnx = _to_form(model, "onnx", ctx, opset, "input", family)
        baseline, wall = timed(lambda: family.evaluate(baseline_onnx, ctx, spec, None))
        baseline_report = {**baseline, "wall_s": wall}
    reference = baseline.outputs

    steps: list[dict[str, Any]] = []
    delivered: dict[str, Path] = {}  # files the steps deliver beside the model (PassResult.files)
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
            first = i == 0 and resumed is None and model.form != "onnx"
            # an export step that asks for the input's export, evaluated above: one export per model per job
            reused = first and isinstance(step, ExportStep) and ExportPass.repeats(step, opset)
            if not reused:
                if first and p.takes == "onnx":
                    model = baseline_onnx  # the input's export, evaluated above: one export per model per job
                model = _to_form(model, p.takes, ctx, opset, f"step{i}", family)
            t0 = time.perf_counter()
            result = (PassResult(baseline_onnx, {**export_metrics(baseline_onnx, opset), "reused": "input"})
                      if reused else p.run(model, step, ctx))
            wall = time.perf_counter() - t0
            model = result.model
            delivered.update(result.files)
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
        if cache is not None and not result.files:  # a resume would skip the step and lose its files: it runs again
            cache.store(i, model, ctx, steps)

    ctx.check_cancelled()
    ctx.begin_step(total - 1, total, "export + evaluate output")
    with _stage("export"):
        if not spec.steps and family.reuses_input_export:
            model = baseline_onnx  # nothing changed the model: its (costly, parity-checked) export is the output
        model = _to_form(model, "onnx", ctx, opset, "output", family)
    assert model.onnx_path is not None
    with _stage("evaluate output"):
        output, wall = timed(lambda: family.evaluate(model, ctx, spec, reference))
        tasks = task_eval.measure(model, ctx, spec)  # a multi-task model: each task through its own output
    output_report = {**output, "wall_s": wall, **({"tasks": tasks} if tasks is not None else {})}
    recheck.confirm_regressions(spec, baseline_onnx, model, baseline_report, output_report, ctx, family.decodes)
    if steps and not steps[-1]["eval"]:
        steps[-1]["eval"] = {"measured": True, **{k: output_report[k] for k in (*family.step_eval_keys, "tasks")
                                                  if k in output_report}}
        if cache is not None:
            cache.finish(steps)

    report = build_report(spec, baseline_report, output_report, steps, ctx.device, family)
    split = getattr(ctx, "calibration_split", None)  # LocalContext's: calibration rows carved from data.eval
    if split is not None:
        report["calibration_split"] = split
    out_path = Path(model.onnx_path)
    # Weights over 2 GB live beside the file (worker.lm.export); the job stores them in model.zip with it.
    data_file = out_path.with_name(out_path.name + ".data")
    files = {"model.onnx.data": data_file} if out_path.name == "model.onnx" and data_file.is_file() else {}
    files.update(delivered)
    return PipelineResult(output_path=out_path, report=report, files=files)
