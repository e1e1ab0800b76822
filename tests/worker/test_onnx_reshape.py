"""Constant-shape flattens in a converted ONNX graph become torch.flatten: any batch, any channel count."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from worker.convert import import_onnx2torch
from worker.onnx_reshape import example_inputs, flatten_reshapes, flatten_start


@pytest.mark.parametrize(("before", "after", "start"), [
    ([1, 32, 1, 1], [1, 32], 1),
    ([2, 16, 2, 2], [2, 64], 1),
    ([2, 3, 4, 5], [2, 3, 20], 2),
    ([1, 32], [1, 2, 16], None),  # a split, not a flatten
    ([2, 32, 1, 1], [64], None),  # the batch merged away
    ([1, 32], [1, 32], None),
    ([4, 8], [8, 4], None),
])
def test_flatten_start(before: list[int], after: list[int], start: int | None) -> None:
    assert flatten_start(before, after) == start


def _constant_reshape_graph(channels: int = 4) -> onnx.ModelProto:
    """Conv -> ReduceMean(keepdims) -> Reshape(x, [1, C]) -> Gemm, as the dynamo exporter writes a pooled flatten."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((channels, 1, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([1, channels], np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((10, channels)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c", "axes"], ["m"], keepdims=1),
             helper.make_node("Reshape", ["m", "shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_constant_flatten_becomes_torch_flatten_and_runs_at_any_batch() -> None:
    import torch

    proto = _constant_reshape_graph()
    module = import_onnx2torch()(proto)
    x = torch.rand(3, 1, 8, 8)
    with pytest.raises(RuntimeError, match="invalid for input of size"):
        module(x)  # as converted: the batch of 1 is frozen in
    example = example_inputs(proto)
    assert example is not None and [tuple(t.shape) for t in example] == [(1, 1, 8, 8)]
    single = module(example[0]).detach()
    assert len(flatten_reshapes(module, example)) == 1 and "torch.flatten" in module.code
    assert torch.allclose(module(example[0]), single)  # same function on the export's input
    assert tuple(module(x).shape) == (3, 10)


def test_graphs_without_a_flatten_like_reshape_are_left_alone() -> None:
    import torch

    module = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    code = module.code
    assert flatten_reshapes(module, [torch.zeros(1, 4)]) == [] and module.code == code
    assert flatten_reshapes(torch.nn.Linear(2, 2), [torch.zeros(1, 2)]) == []  # not a GraphModule
