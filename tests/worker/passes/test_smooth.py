"""smooth (SmoothQuant): on a digits MLP whose most active hidden unit is scaled 1000x up (and the next layer's weights
for it 1000x down: the same model in float, ReLU being positively homogeneous), dynamic INT8's one activation
scale per request spans that unit and flattens the others; the smoothed graph computes the same in float and
its dynamic INT8 keeps the predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from models.spec import JobSpec, QuantizeStep
from tests.factories import digits_split
from tests.worker.conftest import DigitsFiles
from worker.context import LocalContext
from worker.passes.quantize import QuantizePass
from worker.passes.quantizers.smooth import scales, smooth


def _outlier_unit_model(src: Path, dst: Path, x: np.ndarray) -> None:
    m = onnx.load(str(src))
    gemms = [n for n in m.graph.node if n.op_type == "Gemm"]
    inits = {t.name: t for t in m.graph.initializer}
    w0, b0 = (numpy_helper.to_array(inits[gemms[0].input[i]]) for i in (1, 2))
    unit = int(np.maximum(x @ w0.T + b0, 0).mean(0).argmax())  # the most active hidden unit

    def edit(name: str, rows: tuple[slice | int, ...], factor: float) -> None:
        a = numpy_helper.to_array(inits[name]).copy()
        a[rows] *= factor
        inits[name].CopyFrom(numpy_helper.from_array(a, name))

    edit(gemms[0].input[1], (unit, slice(None)), 1000.0)  # [out, in] (transB): the unit's weights
    edit(gemms[0].input[2], (unit,), 1000.0)
    edit(gemms[1].input[1], (slice(None), unit), 1e-3)  # the next layer's weights for it
    onnx.save(m, str(dst))


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"pixels": x})[0])


def _ctx(tmp_path: Path, files: DigitsFiles, model: Path) -> LocalContext:
    spec = JobSpec.model_validate({"model": "mdl", "task": "image-classification",
                                   "data": {"train": "ds_train", "eval": "ds_eval"}})
    return LocalContext(tmp_path / "work", spec, models={"mdl": (model, "onnx", {})},
                        datasets={"ds_train": (files.train, "npz", {}), "ds_eval": (files.eval, "npz", {})}, device="cpu")


def test_scales_balance_activation_and_weight_ranges() -> None:
    s = scales(np.array([100.0, 1.0, 0.0]), np.array([1.0, 1.0, 1.0]), 0.5)
    assert s[0] == np.float32(10.0) and s[1] == 1.0 and 0 < s[2] < 1e-2 + 1e-9


def test_smoothing_keeps_the_float_model_and_rescues_dynamic_int8(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    path = tmp_path / "outlier-unit.onnx"
    _, (x, _) = digits_split()
    _outlier_unit_model(digits_mlp.model, path, x)
    ref = _logits(path, x)
    assert (ref.argmax(1) == _logits(digits_mlp.model, x).argmax(1)).mean() > 0.99  # the same model in float

    ctx = _ctx(tmp_path, digits_mlp, path)
    model = ctx.load_model("input")
    smoothed, report = smooth(path, 0.75, [], model, ctx)
    assert report["activations"] == 3 and report["matmuls"] == 3 and report["largest_scale"] > 10
    np.testing.assert_allclose(_logits(smoothed, x), ref, rtol=1e-3, atol=1e-3 * float(np.abs(ref).max()))

    plain = QuantizePass().run(model, QuantizeStep(type="quantize", mode="dynamic"), ctx)
    fixed = QuantizePass().run(model, QuantizeStep(type="quantize", mode="dynamic", smooth=0.75), ctx)
    assert plain.model.onnx_path is not None and fixed.model.onnx_path is not None
    err = {k: float(np.abs(_logits(r.model.onnx_path, x) - ref).max() / np.abs(ref).max())
           for k, r in (("plain", plain), ("smoothed", fixed))}
    print(err, fixed.metrics["smooth"])
    assert err["smoothed"] < err["plain"] / 3
    assert fixed.metrics["quantized_ops"].get("MatMulInteger", 0) == 3
    # dynamic INT8 of a graph without convolutions skips quant_pre_process's optimization (ORT fuses at load)
    assert plain.metrics["preprocess"] == fixed.metrics["preprocess"] == "no_optimization"
