"""``int8_folded``: int8 weights behind Cast + Mul, ~4x smaller, that ONNX Runtime folds back to float at load."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.spec import QuantizeStep
from worker.core import WorkingModel
from worker.passes.quantize import QuantizePass


class _Ctx:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def check_cancelled(self) -> None:
        pass

    def progress(self, phase: str, **progress: object) -> None:
        pass

    def log(self, message: str) -> None:
        pass


def _conv_net(folder: Path) -> Path:
    """A PP-LCNet-like block: 3x3 stem, depthwise 3x3, 1x1 pointwise, squeeze-excitation, pooled Gemm head."""
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * (2.0 / np.prod(shape[1:])) ** 0.5)
                                       .astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "stem", "stem_b"], ["a"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("HardSwish", ["a"], ["a1"]),
        helper.make_node("Conv", ["a1", "dw"], ["b"], pads=[1, 1, 1, 1], group=32),
        helper.make_node("HardSwish", ["b"], ["b1"]),
        helper.make_node("GlobalAveragePool", ["b1"], ["s"]),
        helper.make_node("Conv", ["s", "se1"], ["s1"]),
        helper.make_node("Relu", ["s1"], ["s2"]),
        helper.make_node("Conv", ["s2", "se2"], ["s3"]),
        helper.make_node("HardSigmoid", ["s3"], ["s4"]),
        helper.make_node("Mul", ["b1", "s4"], ["c"]),
        helper.make_node("Conv", ["c", "pw"], ["d"]),
        helper.make_node("Relu", ["d"], ["d1"]),
        helper.make_node("GlobalAveragePool", ["d1"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fc_b"], ["y"], transB=1),
    ]
    inits = [w("stem", 32, 3, 3, 3), numpy_helper.from_array(np.zeros(32, np.float32), "stem_b"),
             w("dw", 32, 1, 3, 3), w("se1", 8, 32, 1, 1), w("se2", 32, 8, 1, 1), w("pw", 64, 32, 1, 1),
             w("fc", 10, 64), numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)
    path = folder / "cnn.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _quantize(tmp_path: Path, src: Path, **step: object) -> tuple[Path, dict[str, object]]:
    p = QuantizeStep(type="quantize", mode="int8_folded", **step)  # type: ignore[arg-type]
    res = QuantizePass().run(WorkingModel("onnx", "onnx", ["x"], ["y"], onnx_path=src), p, _Ctx(tmp_path))  # type: ignore[arg-type]
    assert res.model.onnx_path is not None
    return Path(res.model.onnx_path), res.metrics


def _weight_bytes(path: Path) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer
               if not t.name.endswith("_b"))


def _run(path: Path, x: np.ndarray, optimized: Path | None = None) -> np.ndarray:
    so = ort.SessionOptions()  # ONNX Runtime's defaults: constant folding on
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


def test_weights_are_int8_a_quarter_the_bytes_and_outputs_track_float(tmp_path: Path) -> None:
    src = _conv_net(tmp_path)
    out, metrics = _quantize(tmp_path, src)
    assert metrics["folded"]["weights"] == {"Conv": 5, "Gemm": 1}  # type: ignore[index]
    assert {t.name: t.data_type for t in onnx.load(str(out)).graph.initializer}["pw_int8"] == TensorProto.INT8
    ratio = _weight_bytes(src) / _weight_bytes(out)
    assert 3.3 < ratio < 4.0, ratio  # int8 codes plus a float scale per output channel (9 weights per depthwise one)
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    ref, got = _run(src, x), _run(out, x)
    assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_onnx_runtime_folds_the_dequantization_at_load(tmp_path: Path) -> None:
    src = _conv_net(tmp_path)
    out, _ = _quantize(tmp_path, src)
    optimized = tmp_path / "optimized.onnx"
    _run(out, np.zeros((1, 3, 32, 32), np.float32), optimized)
    g = onnx.load(str(optimized)).graph
    ops = Counter(n.op_type for n in g.node)
    assert ops["Cast"] == 0, ops  # every Cast folded; the one Mul left is the squeeze-excitation's
    assert ops["Mul"] <= 1 and not any(n.input[0].endswith("_int8_float") for n in g.node if n.op_type == "Mul")
    assert not any(t.data_type == TensorProto.INT8 for t in g.initializer)
    conv_weights = {n.input[1] for n in g.node if "Conv" in n.op_type and len(n.input) > 1}
    assert conv_weights and conv_weights <= {t.name for t in g.initializer}


def test_per_tensor_and_exclusions(tmp_path: Path) -> None:
    src = _conv_net(tmp_path)
    out, metrics = _quantize(tmp_path, src, per_channel=False, op_types_to_exclude=["Gemm"])
    assert metrics["folded"]["weights"] == {"Conv": 5}  # type: ignore[index]
    assert [e["op_type"] for e in metrics["folded"]["excluded"]] == ["Gemm"]  # type: ignore[index]
    scales = [t for t in onnx.load(str(out)).graph.initializer if t.name.endswith("_scale")]
    assert scales and all(int(np.prod(t.dims)) == 1 for t in scales)


def test_the_spec_takes_per_channel_and_exclusions_but_no_weight_only_or_uint8_options() -> None:
    assert QuantizeStep(type="quantize", mode="int8_folded", per_channel=False).per_channel is False
    for bad in ({"weight_type": "uint8"}, {"block_size": 32}, {"algorithm": "rtn"}):
        with pytest.raises(ValueError):
            QuantizeStep(type="quantize", mode="int8_folded", **bad)  # type: ignore[arg-type]
