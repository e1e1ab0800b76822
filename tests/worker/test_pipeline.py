"""The pure pipeline end to end with LocalContext: report, budget, step failures, cancellation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from models.report import Report
from models.spec import JobSpec
from tests.worker.conftest import DigitsFiles
from worker import pipeline
from worker.context import LocalContext
from worker.core import JobCancelled, PassContext, StepFailed, WorkingModel
from worker.passes.base import Pass, PassResult
from worker.stages import StepError

FAST_EVAL = {"latency": {"warmup": 2, "runs": 10, "batch_size": 8}}


def _spec(steps: list[dict[str, Any]], **evaluate: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model": "mdl_mlp",
            "task": "image-classification",
            "data": {"train": "ds_train", "eval": "ds_eval"},
            "steps": steps,
            "evaluate": {**FAST_EVAL, **evaluate},
        }
    )


def _ctx(
    tmp_path: Path, files: DigitsFiles, spec: JobSpec, cls: type[LocalContext] = LocalContext
) -> LocalContext:
    return files.context(tmp_path / "work", spec, cls)


def test_baseline_and_dynamic_quantization_report(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    spec = _spec([{"type": "quantize", "mode": "dynamic"}], max_accuracy_drop=0.02)
    ctx = _ctx(tmp_path, digits_mlp, spec)
    result = pipeline.run(spec, ctx)
    r = result.report
    assert r["task"] == "image-classification" and r["pipeline"] == ["quantize (dynamic)"]
    for side in ("input", "output"):
        ev = r[side]
        assert ev["size_bytes"] > 0 and ev["params"] == 85002 and ev["macs"] == 84480
        assert ev["latency_ms"]["median"] > 0 and ev["latency_setup"]["batch_size"] == 8
        assert ev["accuracy"] >= 0.9 and ev["num_samples"] == 540
    assert r["input"]["accuracy"] == pytest.approx(digits_mlp.torch_accuracy, abs=0.005)
    assert r["gains"]["size_ratio"] >= 2.5 and r["gains"]["params_ratio"] == 1.0
    assert r["gains"]["latency_ratio"] > 0
    assert r["gains"]["accuracy_delta"] == pytest.approx(r["output"]["accuracy"] - r["input"]["accuracy"])
    assert r["fidelity"]["cosine"] > 0.99 and r["fidelity"]["top1_agreement"] > 0.97
    assert r["budget"]["met"] is True and r["budget"]["max_accuracy_drop"] == 0.02
    assert r["environment"]["onnxruntime"] == ort.__version__ and r["environment"]["threads"] == 1
    assert r["environment"]["execution_provider"] == "CPUExecutionProvider" and r["environment"]["cpu_model"]
    (step,) = r["steps"]
    assert step["index"] == 0 and step["type"] == "quantize" and step["label"] == "quantize (dynamic)"
    assert step["wall_s"] > 0 and step["metrics"]["mode"] == "dynamic"
    assert (
        step["eval"]["accuracy"] == pytest.approx(r["output"]["accuracy"])
        and "latency_ms" not in step["eval"]
    )
    # the artifact is a loadable ONNX model and the report is JSON
    sess = ort.InferenceSession(str(result.output_path), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"pixels": np.zeros((3, 64), np.float32)})[0].shape == (3, 10)
    assert json.loads(json.dumps(r))["gains"] == r["gains"] and result.files == {}
    assert Report.read(r).dump() == json.loads(json.dumps(r))  # the typed report reads exactly what was written
    steps = [(e["index"], e["total"], e["label"]) for e in ctx.events if e["kind"] == "step"]
    assert steps == [
        (0, 3, "evaluate input"),
        (1, 3, "quantize (dynamic)"),
        (2, 3, "export + evaluate output"),
    ]


class _ZeroLastLayer(Pass, register=False):
    """Test pass: zeroes the last Gemm's weights, so the model's accuracy collapses."""

    name = "quantize"

    def run(self, model: WorkingModel, params: Any, ctx: PassContext) -> PassResult:
        assert model.onnx_path is not None
        proto = onnx.load(str(model.onnx_path))
        last = [n for n in proto.graph.node if n.op_type == "Gemm"][-1]
        for i, t in enumerate(proto.graph.initializer):
            if t.name == last.input[1]:
                proto.graph.initializer[i].CopyFrom(
                    numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name)
                )
        out = ctx.workdir / "damaged.onnx"
        onnx.save_model(proto, str(out))
        return PassResult(
            WorkingModel("onnx", model.origin, model.input_names, model.output_names, out), {"zeroed": 1}
        )


def test_missed_budget_is_reported_not_raised(
    tmp_path: Path, digits_mlp: DigitsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "pass_for", lambda t: _ZeroLastLayer())
    spec = _spec([{"type": "quantize"}], max_accuracy_drop=0.01)
    result = pipeline.run(spec, _ctx(tmp_path, digits_mlp, spec))
    budget = result.report["budget"]
    assert budget["met"] is False and budget["accuracy_drop"] > 0.5 and budget["metric"] == "accuracy"
    assert result.report["output"]["accuracy"] < 0.3 and result.output_path.exists()
    assert result.report["steps"][0]["metrics"] == {"zeroed": 1}


class _Failing(Pass, register=False):
    name = "quantize"

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def run(self, model: WorkingModel, params: Any, ctx: PassContext) -> PassResult:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "code", "message"),
    [
        (StepFailed("calibration_failed", "ranges are NaN"), "calibration_failed", "ranges are NaN"),
        (RuntimeError("kaboom"), "step_failed", "RuntimeError: kaboom"),
    ],
)
def test_a_failing_step_names_itself(
    tmp_path: Path,
    digits_mlp: DigitsFiles,
    monkeypatch: pytest.MonkeyPatch,
    exc: Exception,
    code: str,
    message: str,
) -> None:
    passes = iter([pipeline.pass_for("quantize"), _Failing(exc)])  # the second step fails
    monkeypatch.setattr(pipeline, "pass_for", lambda t: next(passes))
    spec = _spec(
        [{"type": "quantize", "mode": "fp16"}, {"type": "quantize", "mode": "dynamic"}], metrics=["accuracy"]
    )
    with pytest.raises(StepError) as info:
        pipeline.run(spec, _ctx(tmp_path, digits_mlp, spec))
    assert info.value.step == "steps[1] quantize"
    assert info.value.code == code and info.value.message == message


def test_dataset_mismatch_fails_the_baseline(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 64), np.float32))
    spec = _spec([{"type": "quantize"}])
    ctx = _ctx(tmp_path, digits_mlp, spec)
    ctx.datasets["ds_eval"] = (bad, "npz", {})
    with pytest.raises(StepError) as info:
        pipeline.run(spec, ctx)
    assert info.value.step == "evaluate input" and info.value.code == "dataset_mismatch"
    assert "'pixels'" in info.value.message


class _CancelAtStep1(LocalContext):
    def begin_step(self, index: int, total: int, label: str) -> None:
        super().begin_step(index, total, label)
        if index == 1:
            self.cancelled = True


def test_cancellation_between_steps(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    spec = _spec(
        [{"type": "quantize", "mode": "dynamic"}, {"type": "quantize", "mode": "fp16"}], metrics=["size"]
    )
    ctx = _ctx(tmp_path, digits_mlp, spec, _CancelAtStep1)
    with pytest.raises(JobCancelled):
        pipeline.run(spec, ctx)
    assert [e["index"] for e in ctx.events if e["kind"] == "step"] == [0, 1]


class _TorchIdentity(Pass, register=False):
    """Test pass taking the torch form: returns the model unchanged."""

    name = "prune"

    def run(self, model: WorkingModel, params: Any, ctx: PassContext) -> PassResult:
        assert model.form == "torch"
        return PassResult(model, {"pruned": 0}, [{"epoch": 1, "loss": 0.5}])


def test_forms_are_converted_through_worker_convert(
    tmp_path: Path, digits_mlp: DigitsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A torch step gets a torch model (convert.to_torch), the end exports it (convert.to_onnx)."""
    import dataclasses

    from worker import convert, metrics

    calls: list[str] = []

    def to_torch(model: WorkingModel, ctx: PassContext) -> WorkingModel:
        calls.append("to_torch")
        return dataclasses.replace(model, form="torch", module=model.onnx_path, onnx_path=None)

    def to_onnx(model: WorkingModel, ctx: PassContext, opset: int, *, name: str) -> WorkingModel:
        calls.append(f"to_onnx:{name}:{opset}")
        return dataclasses.replace(model, form="onnx", onnx_path=model.module, module=None)

    def torch_metric(
        model: WorkingModel, data: Any, spec: JobSpec, *, reference: Any = None
    ) -> dict[str, Any]:
        assert reference is not None and reference.shape == (len(data), 10)
        return {"accuracy": 0.5}

    monkeypatch.setattr(convert, "to_torch", to_torch)
    monkeypatch.setattr(convert, "to_onnx", to_onnx)
    monkeypatch.setattr(metrics, "torch_metric", torch_metric)
    monkeypatch.setattr(pipeline, "pass_for", lambda t: _TorchIdentity())
    spec = _spec([{"type": "prune", "ratio": 0.5}], metrics=["accuracy"])
    result = pipeline.run(spec, _ctx(tmp_path, digits_mlp, spec))
    assert calls == ["to_torch", "to_onnx:output:17"]
    step = result.report["steps"][0]
    assert step["label"] == "prune (structured 0.5)" and step["eval"] == {"measured": True, "accuracy": 0.5}
    assert step["curve"] == [{"epoch": 1, "loss": 0.5}]
    assert result.report["gains"]["accuracy_delta"] == 0.0


def test_no_steps_returns_the_input_with_exact_fidelity(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    spec = _spec([], max_accuracy_drop=0.0, metrics=["accuracy", "size"])
    result = pipeline.run(spec, _ctx(tmp_path, digits_mlp, spec))
    r = result.report
    assert result.output_path.read_bytes() == digits_mlp.model.read_bytes()
    assert r["pipeline"] == [] and r["steps"] == [] and r["fidelity"]["max_abs_err"] == 0.0
    assert r["gains"]["size_ratio"] == 1.0 and r["gains"]["latency_ratio"] is None
    assert r["budget"] == {"max_accuracy_drop": 0.0, "metric": "accuracy", "accuracy_drop": 0.0, "met": True}


def run_cnn_dynamic_int8(tmp_path: Path) -> pipeline.PipelineResult:
    """The digits residual CNN through dynamic INT8 (its convolutions become ConvInteger, slow on CPU)."""
    from tests.factories import write_npz
    from tests.factories_train import INPUT, cnn_onnx, digits

    model_path, _ = cnn_onnx()
    _, evald = digits()
    eval_npz = write_npz(tmp_path / "eval.npz", evald.inputs[INPUT][:64], evald.labels[:64], input_name=INPUT)
    spec = JobSpec.model_validate({
        "model": "mdl_cnn", "task": "image-classification", "data": {"eval": "ds_eval"},
        "steps": [{"type": "quantize", "mode": "dynamic"}],
        "evaluate": {"latency": {"warmup": 5, "runs": 40, "batch_size": 8}},
    })
    ctx = LocalContext(tmp_path / "work", spec, models={"mdl_cnn": (model_path, "onnx", {})},
                       datasets={"ds_eval": (eval_npz, "npz", {})}, device="cpu")
    return pipeline.run(spec, ctx)


def test_a_cnn_made_slower_by_dynamic_int8_says_so(tmp_path: Path) -> None:
    """Dynamic INT8 runs a CNN's convolutions through ConvInteger, slower on CPU: the report warns, with the ratio."""
    from models.report_view import warning_lines

    r = run_cnn_dynamic_int8(tmp_path).report
    assert r["input"]["latency_ms"]["median"] * 1.05 < r["output"]["latency_ms"]["median"]
    # the first figures said slower, so both were timed again interleaved; the warning reads those
    before, after = r["input"]["latency_recheck"]["median"], r["output"]["latency_recheck"]["median"]
    assert after > before * 1.05, (before, after)
    slower = [w for w in r["warnings"] if w["code"] == "slower_than_input"]
    assert len(slower) == 1 and slower[0]["ratio"] == pytest.approx(after / before, rel=1e-2)
    assert f"{after / before:.1f}\u00d7 slower than the input model" in slower[0]["message"]
    assert any("slower" in line for line in warning_lines(r))


class _CancelDuringEvaluation(LocalContext):
    """The cancel flag flips on the first check made inside the evaluation (the second check of the job)."""

    checks = 0

    def check_cancelled(self) -> None:
        self.checks += 1
        if self.checks == 2:
            self.cancelled = True
        super().check_cancelled()


@pytest.mark.parametrize("metrics", [["latency"], ["accuracy"]])
def test_a_cancel_during_evaluation_ends_it_promptly(
    tmp_path: Path, digits_mlp: DigitsFiles, metrics: list[str]
) -> None:
    spec = _spec([{"type": "quantize", "mode": "dynamic"}], metrics=metrics,
                 latency={"warmup": 0, "runs": 1000, "batch_size": 8}, batch_size=1)
    ctx = _ctx(tmp_path, digits_mlp, spec, _CancelDuringEvaluation)
    with pytest.raises(JobCancelled) as info:
        pipeline.run(spec, ctx)
    # Raised from inside the evaluation's loops, not at the pipeline's next step boundary.
    assert any(Path(str(entry.path)).name == "evaluate.py" for entry in info.traceback)
