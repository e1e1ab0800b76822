"""Our onnx2torch converters for opset-18+ operators: each converted node matches ONNX Runtime on real inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from worker.convert import import_onnx2torch

convert = import_onnx2torch()


def _single(op: str, opset: int, shape: list[int], outs: int = 1, consts: dict[str, np.ndarray] | None = None,
            inputs: list[str] | None = None, **attrs: Any) -> onnx.ModelProto:
    consts = consts or {}
    names = ["x", *(inputs if inputs is not None else list(consts))]
    node = helper.make_node(op, names, [f"y{i}" for i in range(outs)], **attrs)
    graph = helper.make_graph(
        [node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_empty_tensor_value_info(f"y{i}") for i in range(outs)],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return model


CASES = [
    ("AveragePool-19", _single("AveragePool", 19, [2, 3, 8, 8], kernel_shape=[3, 3], strides=[2, 2],
                               pads=[1, 1, 1, 1], dilations=[1, 1], count_include_pad=1)),
    ("AveragePool-22", _single("AveragePool", 22, [2, 3, 8, 8], kernel_shape=[2, 2], strides=[2, 2])),
    ("ReduceMean-18 axes input", _single("ReduceMean", 18, [2, 3, 4, 5], consts={"axes": np.array([2, 3])})),
    ("ReduceMax-18 keepdims=0", _single("ReduceMax", 18, [2, 3, 4], consts={"axes": np.array([1])}, keepdims=0)),
    ("ReduceSumSquare-18 no axes", _single("ReduceSumSquare", 18, [2, 3, 4], keepdims=0)),
    ("ReduceL2-18 noop", _single("ReduceL2", 18, [2, 3], noop_with_empty_axes=1)),
    ("ReduceSumSquare-18 noop", _single("ReduceSumSquare", 18, [2, 3], noop_with_empty_axes=1)),
    ("ReduceMean-18 noop", _single("ReduceMean", 18, [2, 3], noop_with_empty_axes=1)),
    ("Split-18 num_outputs uneven", _single("Split", 18, [2, 7], outs=3, axis=1, num_outputs=3)),
    ("Split-18 split input", _single("Split", 18, [2, 7], outs=2, consts={"split": np.array([3, 4])}, axis=1)),
    ("Pad-19 reflect", _single("Pad", 19, [1, 2, 5, 5], consts={"pads": np.array([0, 0, 1, 2, 0, 0, 1, 2])},
                               mode="reflect")),
    ("Reshape-19 allowzero", _single("Reshape", 19, [2, 3, 4], consts={"shape": np.array([4, -1])}, allowzero=1)),
    ("Reshape-21 copy zero", _single("Reshape", 21, [2, 3, 4], consts={"shape": np.array([0, -1])})),
    ("Gelu-20 tanh", _single("Gelu", 20, [3, 16], approximate="tanh")),
    ("Gelu-20", _single("Gelu", 20, [3, 16])),
    ("Resize-19 nearest", _single("Resize", 19, [1, 2, 4, 4], consts={"roi": np.array([], np.float32),
                                  "scales": np.array([1, 1, 2, 2], np.float32)}, mode="nearest")),
    ("Conv-22 (type-only)", _single("Conv", 22, [1, 2, 6, 6], consts={"w": np.ones((4, 2, 3, 3), np.float32)})),
    ("Cast-21 (type-only)", _single("Cast", 21, [4, 4], to=TensorProto.FLOAT)),
    ("Flatten-21 (type-only)", _single("Flatten", 21, [2, 3, 4], axis=1)),
]


@pytest.mark.parametrize(("name", "model"), CASES, ids=[c[0] for c in CASES])
def test_converted_node_matches_onnx_runtime(name: str, model: onnx.ModelProto) -> None:
    import torch

    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    with torch.no_grad():
        got = convert(model)(torch.from_numpy(x))
    got = got if isinstance(got, tuple | list) else (got,)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert tuple(g.shape) == w.shape, name
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        (_single("AveragePool", 19, [1, 1, 8, 8], kernel_shape=[2, 2], dilations=[2, 2]), r"dilations \[2, 2\]"),
        (_single("Pad", 18, [1, 4], consts={"pads": np.array([1, 1]), "cv": np.array(0.0, np.float32),
                                            "axes": np.array([1])}), "axes input"),
        (_single("Resize", 19, [1, 1, 4, 4], consts={"roi": np.array([], np.float32),
                 "scales": np.array([1, 1, 2, 2], np.float32)}, mode="linear", antialias=1), "antialias"),
    ],
)
def test_what_torch_cannot_express_is_refused_by_name(model: onnx.ModelProto, needle: str) -> None:
    with pytest.raises(NotImplementedError, match=needle):
        convert(model)


def test_registration_is_idempotent_and_never_replaces_onnx2torch() -> None:
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription

    from worker.onnx2torch_ops import ADDED, register

    before = dict(_CONVERTER_REGISTRY)
    assert register() == ADDED and dict(_CONVERTER_REGISTRY) == before
    assert ("AveragePool", 19) in ADDED and ("AveragePool", 11) not in ADDED
    assert OperationDescription("", "Conv", 11) in _CONVERTER_REGISTRY


def test_todays_default_export_of_a_plain_cnn_prunes(tmp_path: Path) -> None:
    """torch.onnx.export's default output (opset 20, AveragePool-19, ReduceMean-18, model.onnx.data), zipped,
    goes through ``prune(structured 0.5)`` and comes back as a smaller ONNX model."""
    import torch

    from models.spec import JobSpec
    from tests import factories_onnx, factories_train
    from worker import pipeline
    from worker.context import LocalContext

    torch.manual_seed(0)
    src = factories_onnx.default_export(factories_train.residual_cnn(), tmp_path / "export", torch.zeros(2, 1, 8, 8))
    assert (src.parent / "model.onnx.data").is_file()
    proto = onnx.load(str(src), load_external_data=False)
    assert proto.opset_import[0].version >= 19 and "AveragePool" in {n.op_type for n in proto.graph.node}
    packed = factories_onnx.archive_of(src, tmp_path / "cnn.zip")
    _, evald = factories_train.digits()
    eval_npz = tmp_path / "eval.npz"
    np.savez(eval_npz, input=evald.inputs["input"][:64], labels=evald.labels[:64])
    spec = JobSpec.model_validate({
        "model": "mdl_cnn", "task": "image-classification", "data": {"eval": "ds_eval"},
        "steps": [{"type": "prune", "method": "structured", "ratio": 0.5}],
        "evaluate": {"latency": {"warmup": 1, "runs": 3, "batch_size": 8}},
    })
    ctx = LocalContext(tmp_path / "work", spec, models={"mdl_cnn": (packed, "onnx", {})},
                       datasets={"ds_eval": (eval_npz, "npz", {})}, device="cpu")
    report = pipeline.run(spec, ctx).report
    assert report["output"]["params"] < 0.5 * report["input"]["params"], report["output"]
    assert report["input"]["macs"] > report["output"]["macs"] > 0
