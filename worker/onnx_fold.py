"""Bias additions written as separate nodes, folded into the layers they belong to before ONNX -> torch.

Some exporters (PaddlePaddle's paddle2onnx among them) write a convolution's bias as ``Conv`` without bias
followed by ``Add(y, B)`` with a constant ``B`` of shape ``[1, C, 1, 1]``, and a linear layer as ``MatMul(x, W)``
then ``Add(y, b)``. Converted as they are, the bias becomes a constant tensor outside the layer: structured
pruning narrows the convolution to ``C / 2`` channels and leaves ``B`` at ``C``, and the next forward fails
(``The size of tensor a (32) must match the size of tensor b (64)``); a ``MatMul`` with a constant weight is no
``nn.Linear`` either, so the layer before it cannot be narrowed. ``fold_bias_adds`` rewrites such pairs as
``Conv(x, W, B)`` and ``Gemm(x, W, b)`` (2-D inputs only), which compute the same values and convert to
``nn.Conv2d`` / ``nn.Linear`` with their bias inside.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx


def _per_channel(shape: list[int], rank: int, channels: int) -> bool:
    """Whether a constant of ``shape`` adds one value per channel to a ``[N, C, ...]`` tensor of ``rank``."""
    if len(shape) > rank:
        return False
    padded = [1] * (rank - len(shape)) + list(shape)
    return padded[1] == channels and all(d == 1 for i, d in enumerate(padded) if i != 1)


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Every value's rank that ONNX shape inference knows."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an exporter's graph the checker rejects: no ranks, no MatMul folding
        return {}
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name: len(v.type.tensor_type.shape.dim) for v in values if v.type.tensor_type.HasField("shape")}


def fold_bias_adds(model: onnx.ModelProto) -> list[str]:
    """In place: ``Conv`` + constant per-channel ``Add`` -> ``Conv`` with bias, 2-D ``MatMul`` + constant ``Add``
    -> ``Gemm``; the names of the layers folded."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    uses.update(o.name for o in graph.output)
    producer = {out: node for node in graph.node for out in node.output}
    ranks: dict[str, int] | None = None
    folded: list[str] = []
    dropped: list[onnx.NodeProto] = []
    for add in graph.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        for value, const in (add.input, add.input[::-1]):
            layer = producer.get(value)
            if layer is None or const not in inits or uses[value] != 1 or uses[const] != 1:
                continue
            bias = numpy_helper.to_array(inits[const])
            if layer.op_type == "Conv" and len(layer.input) == 2 and layer.input[1] in inits:
                weight = inits[layer.input[1]]
                if not _per_channel(list(bias.shape), len(weight.dims), int(weight.dims[0])):
                    continue
                name = f"{const}__conv_bias"
                graph.initializer.append(numpy_helper.from_array(bias.reshape(-1), name))
                layer.input.append(name)
            elif layer.op_type == "MatMul" and layer.input[1] in inits and len(inits[layer.input[1]].dims) == 2:
                width = int(inits[layer.input[1]].dims[1])
                if bias.size != width or len(bias.shape) > 2:
                    continue
                ranks = _ranks(model) if ranks is None else ranks
                if ranks.get(layer.input[0]) != 2:
                    continue
                name = f"{const}__gemm_bias"
                graph.initializer.append(numpy_helper.from_array(bias.reshape(-1), name))
                gemm = helper.make_node("Gemm", [layer.input[0], layer.input[1], name], [value], name=layer.name)
                layer.CopyFrom(gemm)
            else:
                continue
            layer.output[0] = add.output[0]
            dropped.append(add)
            folded.append(layer.name or layer.output[0])
            break
    for add in dropped:
        graph.node.remove(add)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = {name for add in dropped for name in add.input} - used
    for t in [t for t in graph.initializer if t.name in unused]:
        graph.initializer.remove(t)
    return folded
