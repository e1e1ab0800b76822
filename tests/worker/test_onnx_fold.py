"""worker.onnx_fold: paddle2onnx-style biases (``Conv`` + ``Add([1, C, 1, 1])``, ``MatMul`` + ``Add([N])``) become
layers with their bias inside, computing the same outputs; the converted module then prunes structurally."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from models.spec import JobSpec, PruneStep
from tests.factories import write_npz
from worker.context import LocalContext
from worker.convert import to_torch
from worker.onnx_fold import fold_bias_adds
from worker.passes.prune import PrunePass


def _paddle_style(spatial_bias: bool = False) -> onnx.ModelProto:
    """x [N,3,8,8] -> Conv (no bias) + Add -> Relu -> Conv (no bias) + Add -> GAP -> Flatten -> MatMul + Add."""
    rng = np.random.default_rng(0)

    def c(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)

    first_bias = c("b1", 1, 16, 8, 8) if spatial_bias else c("b1", 1, 16, 1, 1)  # a spatial one is not a bias
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Add", ["c1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["b2", "c2"], ["a2"]),  # the constant first
        helper.make_node("GlobalAveragePool", ["a2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "w3"], ["m"], name="head"),
        helper.make_node("Add", ["m", "b3"], ["logits"]),
    ]
    inits = [c("w1", 16, 3, 3, 3), first_bias, c("w2", 32, 16, 1, 1), c("b2", 32, 1, 1), c("w3", 32, 4), c("b3", 4)]
    graph = helper.make_graph(nodes, "paddle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def test_bias_adds_fold_into_conv_and_gemm_with_the_same_outputs() -> None:
    model = _paddle_style()
    x = np.random.default_rng(1).normal(size=(5, 3, 8, 8)).astype(np.float32)
    before = _run(model, x)
    assert fold_bias_adds(model) == ["conv1", "conv2", "head"]
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu", "Conv", "GlobalAveragePool", "Flatten", "Gemm"]
    assert {t.name for t in model.graph.initializer} == {"w1", "w2", "w3", "b1__conv_bias", "b2__conv_bias",
                                                         "b3__gemm_bias"}
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-5, atol=1e-5)


def test_an_add_that_is_not_a_per_channel_bias_stays() -> None:
    model = _paddle_style(spatial_bias=True)
    assert fold_bias_adds(model) == ["conv2", "head"]
    assert [n.op_type for n in model.graph.node][:2] == ["Conv", "Add"]


def test_a_paddle_style_graph_prunes_structurally(tmp_path: Path) -> None:
    path = tmp_path / "paddle.onnx"
    onnx.save(_paddle_style(), str(path))
    rng = np.random.default_rng(2)
    data = write_npz(tmp_path / "d.npz", rng.normal(size=(8, 3, 8, 8)).astype(np.float32), rng.integers(0, 4, 8),
                     input_name="x")
    spec = JobSpec.model_validate({"model": "m", "task": "image-classification", "data": {"eval": "d"}})
    ctx = LocalContext(tmp_path / "work", spec, models={"m": (path, "onnx", {})},
                       datasets={"d": (data, "npz", {})}, device="cpu")
    model = to_torch(ctx.load_model("input"), ctx)
    result = PrunePass().run(model, PruneStep(type="prune", ratio=0.5), ctx)
    assert result.metrics["params_after"] < 0.6 * result.metrics["params_before"]
    assert any(e.get("data", {}).get("bias_adds_folded") == 3 for e in ctx.events)
