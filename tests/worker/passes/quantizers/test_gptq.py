"""GPTQ's math and its MatMulNBits packing, against ONNX Runtime's kernel and against round-to-nearest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from worker.lm.stream import _quantize_columns
from worker.passes.quantizers import gptq


class _Ctx:
    def check_cancelled(self) -> None:
        pass

    def progress(self, phase: str, **progress: object) -> None:
        pass


def _matmul(w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"], name="act"), helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], [numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["y"], {"x": x})[0])


def _correlated(rng: np.random.Generator, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Inputs near a 16-dimensional subspace (fixed by ``seed``) plus noise: strongly correlated features, as
    an LLM's activations are (what makes GPTQ's error spreading pay)."""
    mix = np.random.default_rng(seed).normal(size=(16, k))
    return (rng.normal(size=(rows, 16)) @ mix + 0.1 * rng.normal(size=(rows, k))).astype(np.float32)


@pytest.mark.parametrize(("k", "n", "block", "symmetric"), [(96, 40, 32, False), (128, 24, 64, True), (200, 16, 64, False)])
def test_packed_file_computes_what_the_codes_say(k: int, n: int, block: int, symmetric: bool) -> None:
    """ORT's MatMulNBits over our packing equals x @ dequantized(codes): layout, nibble order, padding of K and
    of an odd block count's zero points."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(k, n)).astype(np.float32)
    m = _matmul(w)
    x = _correlated(rng, 256, k)
    hess = gptq.hessians(m, ["mm"], [{"x": x}], _Ctx(), 1)  # type: ignore[arg-type]
    q = gptq.quantize_weight(w, hess["h"], 4, block, symmetric)
    deq = (q.codes.astype(np.float32) - np.repeat(q.zeros, block, 1)) * np.repeat(q.scales, block, 1)
    errors = gptq.apply(m, ["mm"], hess, 4, block, symmetric, 0, _Ctx())  # type: ignore[arg-type]
    assert [node.op_type for node in m.graph.node] == ["Relu", "MatMulNBits"]
    assert "W" not in {t.name for t in m.graph.initializer}
    h = np.maximum(x, 0)
    np.testing.assert_allclose(_run(m, x), h @ deq[:, :k].T, rtol=1e-4, atol=1e-3)
    assert 0 < errors["mm"] < 0.2


def test_gptq_loses_less_than_round_to_nearest_on_correlated_inputs() -> None:
    """On the calibration distribution GPTQ's output error is well below RTN's on the same block grid (ORT's
    own RTN kernel), and it holds on held-out rows of the same distribution."""
    rng = np.random.default_rng(1)
    k, n, block = 256, 64, 64
    w = rng.normal(size=(k, n)).astype(np.float32)
    m = _matmul(w)
    x_cal, x_test = _correlated(rng, 2048, k), _correlated(np.random.default_rng(2), 512, k)
    hess = gptq.hessians(m, ["mm"], [{"x": x_cal[:1024]}, {"x": x_cal[1024:]}], _Ctx(), 1)  # type: ignore[arg-type]
    gptq.apply(m, ["mm"], hess, 4, block, False, 0, _Ctx())  # type: ignore[arg-type]
    ref = np.maximum(x_test, 0) @ w
    packed, scales, zeros = _quantize_columns(w, 4, block, False)
    codes = np.stack([packed & 0x0F, packed >> 4], -1).reshape(n, k).astype(np.float32)
    zp = np.stack([zeros & 0x0F, zeros >> 4], -1).reshape(n, -1)[:, : k // block].astype(np.float32)
    rtn = (codes - np.repeat(zp, block, 1)) * np.repeat(scales, block, 1)
    err_rtn = np.linalg.norm(np.maximum(x_test, 0) @ rtn.T - ref) / np.linalg.norm(ref)
    err_gptq = np.linalg.norm(_run(m, x_test) - ref) / np.linalg.norm(ref)
    assert err_gptq < 0.5 * err_rtn, (err_gptq, err_rtn)


def test_dead_inputs_and_a_singular_hessian_still_quantize(tmp_path: Path) -> None:
    """Inputs that are always zero (a ReLU that never fires) make H singular: those weights quantize to zero
    contribution and the rest is finite."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(64, 8)).astype(np.float32)
    x = rng.normal(size=(32, 64)).astype(np.float32)
    x[:, :16] = -1.0  # ReLU kills them
    m = _matmul(w)
    hess = gptq.hessians(m, ["mm"], [{"x": x}], _Ctx(), 1)  # type: ignore[arg-type]
    q = gptq.quantize_weight(w, hess["h"], 4, 32, False)
    assert np.isfinite(q.scales).all() and q.codes.max() <= 15
    gptq.apply(m, ["mm"], hess, 4, 32, False, None, _Ctx())  # type: ignore[arg-type]
    ref = np.maximum(x, 0) @ w
    assert np.linalg.norm(_run(m, x) - ref) / np.linalg.norm(ref) < 0.2
