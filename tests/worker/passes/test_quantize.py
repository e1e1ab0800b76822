"""ORT quantization on the digits MLP: smaller files, close outputs, accuracy kept, exclusions honoured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.spec import JobSpec, QuantizeStep
from tests.factories import digits_split
from tests.worker.conftest import DigitsFiles
from worker.context import LocalContext
from worker.formats.onnx_model import count_params
from worker.passes import REGISTRY
from worker.passes.base import JobCancelled, WorkingModel
from worker.passes.quantize import QuantizePass


def _ctx(tmp_path: Path, files: DigitsFiles, cls: type[LocalContext] = LocalContext) -> LocalContext:
    spec = JobSpec.model_validate({"model": "mdl_mlp", "data": {"train": "ds_train", "eval": "ds_eval"}})
    return files.context(tmp_path / "work", spec, cls)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"pixels": x})[0], dtype=np.float32)


def _accuracy(path: Path) -> float:
    _, (x, y) = digits_split()
    return float((_run(path, x).argmax(1) == y).mean())


def _quantize(
    tmp_path: Path, files: DigitsFiles, **params: Any
) -> tuple[WorkingModel, dict[str, Any], LocalContext]:
    ctx = _ctx(tmp_path, files)
    model = ctx.load_model("input")
    result = QuantizePass().run(model, QuantizeStep(type="quantize", **params), ctx)
    assert result.model.onnx_path is not None and result.model.onnx_path.parent == ctx.workdir
    assert result.model.input_names == ["pixels"] and result.model.output_names == ["logits"]
    return result.model, result.metrics, ctx


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_registered_with_form_and_paper() -> None:
    assert REGISTRY["quantize"] is QuantizePass and QuantizePass.takes == "onnx"
    assert "Jacob et al. 2018" in (QuantizePass.__doc__ or "")


def test_dynamic_int8_is_smaller_and_keeps_accuracy(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    model, metrics, ctx = _quantize(tmp_path, digits_mlp, mode="dynamic")
    assert model.onnx_path is not None
    ratio = digits_mlp.model.stat().st_size / model.onnx_path.stat().st_size
    assert ratio >= 2.5 and metrics["size_ratio"] == pytest.approx(ratio)
    assert metrics["quantized_ops"].get("MatMulInteger", 0) == 3
    assert count_params(onnx.load(str(model.onnx_path))) == 85002  # same weights, 8-bit
    _, (x, _) = digits_split()
    ref, out = _run(digits_mlp.model, x), _run(model.onnx_path, x)
    assert np.abs(ref - out).max() < 0.05 * np.abs(ref).max()
    assert (ref.argmax(1) == out.argmax(1)).mean() >= 0.97
    assert _accuracy(model.onnx_path) >= _accuracy(digits_mlp.model) - 0.02
    assert any(e["kind"] == "progress" for e in ctx.events)


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_static_qdq_with_each_calibration_method(
    tmp_path: Path, digits_mlp: DigitsFiles, method: str
) -> None:
    model, metrics, ctx = _quantize(
        tmp_path, digits_mlp, mode="static", calibration={"method": method, "samples": 100}
    )
    assert model.onnx_path is not None
    ops = _ops(model.onnx_path)
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6
    assert metrics["calibration"]["samples"] == 100 and metrics["calibration"]["method"] == method
    assert _accuracy(model.onnx_path) >= _accuracy(digits_mlp.model) - 0.03
    calibrating = [e for e in ctx.events if e["kind"] == "progress" and e["phase"] == "calibrating"]
    assert len(calibrating) >= 4  # 100 samples in batches of 32 (25 for histograms), reported per batch


def test_fp16_has_half_weights_and_close_outputs(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    model, metrics, _ = _quantize(tmp_path, digits_mlp, mode="fp16")
    assert model.onnx_path is not None
    proto = onnx.load(str(model.onnx_path))
    weights = [t for t in proto.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    onnx.checker.check_model(proto)
    _, (x, _) = digits_split()
    np.testing.assert_allclose(_run(model.onnx_path, x), _run(digits_mlp.model, x), atol=1e-2)
    assert metrics["size_ratio"] > 1.9


def _gemm_weights_are_float(path: Path) -> list[bool]:
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    out = []
    for n in proto.graph.node:
        if n.op_type in ("Gemm", "MatMul") and n.input[1] in inits:
            out.append(inits[n.input[1]].data_type == onnx.TensorProto.FLOAT)
        elif n.op_type in ("Gemm", "MatMul"):
            out.append(False)  # fed by DequantizeLinear
    return out


def test_excluded_op_types_stay_float(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    static, _, _ = _quantize(tmp_path / "s", digits_mlp, mode="static", op_types_to_exclude=["Gemm"])
    assert static.onnx_path is not None
    assert all(_gemm_weights_are_float(static.onnx_path))
    dynamic, _, _ = _quantize(tmp_path / "d", digits_mlp, mode="dynamic", op_types_to_exclude=["Gemm"])
    assert dynamic.onnx_path is not None
    assert "MatMulInteger" not in _ops(dynamic.onnx_path) and all(_gemm_weights_are_float(dynamic.onnx_path))


def test_excluded_node_stays_float(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    last = next(n.name for n in reversed(onnx.load(str(digits_mlp.model)).graph.node) if n.op_type == "Gemm")
    model, _, _ = _quantize(tmp_path, digits_mlp, mode="static", nodes_to_exclude=[last])
    assert model.onnx_path is not None
    assert _gemm_weights_are_float(model.onnx_path) == [False, False, True]


def test_cancellation_during_calibration(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    class CancelWhileCalibrating(LocalContext):
        def progress(self, phase: str, **kw: Any) -> None:
            super().progress(phase, **kw)
            if phase == "calibrating":
                self.cancelled = True

    ctx = _ctx(tmp_path, digits_mlp, CancelWhileCalibrating)
    model = ctx.load_model("input")
    with pytest.raises(JobCancelled):
        QuantizePass().run(model, QuantizeStep(type="quantize", mode="static"), ctx)
    assert not list(ctx.workdir.glob("quantized-static*.onnx"))


def test_reduce_range_follows_the_cpu_unless_the_spec_says() -> None:
    from worker.passes.quantize import lacks_vnni, reduce_range

    avx2 = "processor : 0\nflags : fpu sse2 avx avx2 fma\n"
    vnni = "processor : 0\nflags : fpu sse2 avx avx2 avx512f avx512_vnni\n"
    assert lacks_vnni("x86_64", avx2) is True
    assert lacks_vnni("x86_64", vnni) is False
    assert lacks_vnni("x86_64", avx2.replace("fma", "avx_vnni")) is False
    assert lacks_vnni("aarch64", avx2) is False  # Arm int8 kernels (sdot) do not saturate
    assert lacks_vnni("x86_64", None) is True
    assert reduce_range(QuantizeStep(type="quantize", reduce_range=False)) is False
    assert reduce_range(QuantizeStep(type="quantize", reduce_range=True)) is True


def test_dynamic_reduce_range_is_reported_and_stays_close(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    model, metrics, _ = _quantize(tmp_path, digits_mlp, mode="dynamic", reduce_range=True)
    assert metrics["reduce_range"] is True
    assert model.onnx_path is not None
    _, (x, _) = digits_split()
    ref, out = _run(digits_mlp.model, x), _run(model.onnx_path, x)
    assert np.abs(ref - out).max() < 0.05 * np.abs(ref).max()
