"""Converters onnx2torch 1.5 lacks for the opset-18+ operators today's PyTorch exporter emits, registered
through onnx2torch's own registry (``add_converter``) when ``worker.convert.import_onnx2torch`` runs.

Two kinds:

- a newer operator version that only widened the allowed types (bfloat16, float8, int4 ...) reuses the
  converter of the version before it (``TYPE_ONLY``);
- a version whose semantics changed gets a small converter here: AveragePool-19 (``dilations``), the
  Reduce* family at 18 (``axes`` became an input), Reshape-14+ with ``allowzero=1``, Split-18 (``num_outputs``), Pad-18/19 (``axes`` input,
  ``wrap`` mode), Resize-18/19 (antialias, axes, aspect-ratio policy) and Gelu-20. Inputs they cannot
  express in torch raise NotImplementedError naming the attribute, which the runner reports.

Import it after ``import_onnx2torch`` (onnx2torch needs its stand-in torchvision first).
A version onnx2torch already registers is never replaced, except Reshape-14 (ours also takes allowzero=1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter
from onnx2torch.node_converters.reshape import OnnxReshape
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import (
    OnnxMapping,
    OnnxToTorchModule,
    OperationConverterResult,
    get_const_value,
    onnx_mapping_from_node,
)
from torch import nn

Converter = Callable[[OnnxNode, OnnxGraph], OperationConverterResult]

# op type -> (new since-versions, the registered version whose converter they reuse unchanged)
TYPE_ONLY: dict[str, tuple[tuple[int, ...], int]] = {
    "Acos": ((22,), 7), "Asin": ((22,), 7), "Atan": ((22,), 7), "Cos": ((22,), 7), "Sin": ((22,), 7),
    "Tan": ((22,), 7), "Cast": ((19, 21, 23, 24, 25), 13), "Constant": ((19, 21, 23, 24, 25), 13),
    "ConstantOfShape": ((20, 21, 23, 24, 25), 9), "Conv": ((22,), 11), "ConvTranspose": ((22,), 11),
    "Dropout": ((22,), 13), "Elu": ((22,), 6), "Equal": ((19,), 13), "EyeLike": ((22,), 9),
    "Flatten": ((21, 23, 24, 25), 13), "GlobalAveragePool": ((22,), 1), "GreaterOrEqual": ((16,), 12),
    "LessOrEqual": ((16,), 12), "HardSigmoid": ((22,), 6), "HardSwish": ((22,), 14),
    "Identity": ((19, 21, 23, 24, 25), 16), "InstanceNormalization": ((22,), 6), "IsInf": ((20,), 10),
    "IsNaN": ((20,), 13), "MaxPool": ((22,), 12),
    "Round": ((22,), 11), "Selu": ((22,), 6), "Shape": ((19, 21, 23, 24, 25), 15), "Softplus": ((22,), 1),
    "Softsign": ((22,), 1), "Squeeze": ((23, 24, 25), 21), "Transpose": ((21, 23, 24, 25), 13),
    "Unsqueeze": ((21, 23, 24, 25), 13),
}

REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
              "ReduceMin", "ReduceProd", "ReduceSumSquare")

ADDED: list[tuple[str, int]] = []  # (op type, version) this module registered, in order


def _registered(op: str, version: int) -> Converter | None:
    found: Converter | None = _CONVERTER_REGISTRY.get(OperationDescription("", op, version))
    return found


def _register(op: str, version: int, converter: Converter) -> None:
    if _registered(op, version) is None:
        add_converter(operation_type=op, version=version)(converter)
        ADDED.append((op, version))


def _delegate(op: str, version: int) -> Converter:
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        base = _registered(op, version)
        if base is None:
            raise NotImplementedError(f"no converter for {op} version {version}")
        return base(node, graph)

    return convert


def _trimmed(node: OnnxNode, count: int) -> OnnxMapping:
    """The node's mapping with only its first ``count`` inputs (those the reused torch module takes)."""
    return OnnxMapping(inputs=tuple(node.input_values[:count]), outputs=node.output_values)


def _average_pool_19(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    dilations = list(node.attributes.get("dilations", []))
    if any(int(d) != 1 for d in dilations):
        raise NotImplementedError(f"AveragePool with dilations {dilations} (torch's AvgPool has none)")
    return _delegate("AveragePool", 11)(node, graph)


class OnnxReduceNoop(nn.Module, OnnxToTorchModule):
    """A Reduce* with no axes and ``noop_with_empty_axes=1``: no reduction, only its element-wise part."""

    def __init__(self, operation_type: str) -> None:
        super().__init__()
        self.operation_type = operation_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.operation_type in ("ReduceL1", "ReduceL2"):
            return torch.abs(x)
        if self.operation_type == "ReduceLogSum":
            return torch.log(x)
        if self.operation_type == "ReduceSumSquare":
            return x * x
        return x  # Mean, Max, Min, Prod, LogSumExp of one element are the element


def _reduce_18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    keepdims = int(node.attributes.get("keepdims", 1))
    noop = int(node.attributes.get("noop_with_empty_axes", 0))
    axes: list[int] | None = None
    if len(node.input_values) > 1 and node.input_values[1]:
        try:
            value = get_const_value(node.input_values[1], graph)
        except KeyError as exc:
            raise NotImplementedError(f"{node.operation_type} with axes computed at run time") from exc
        axes = [int(a) for a in (value.tolist() if isinstance(value, torch.Tensor) else value)]
    module: nn.Module
    if not axes and noop:
        module = OnnxReduceNoop(node.operation_type)
    else:
        module = OnnxReduceStaticAxes(operation_type=node.operation_type, axes=axes, keepdims=keepdims)
    return OperationConverterResult(torch_module=module, onnx_mapping=_trimmed(node, 1))


class OnnxSplitOutputs(nn.Module, OnnxToTorchModule):
    """Split-18 with ``num_outputs``: chunks of ceil(length / n), the last one smaller (ONNX's rule)."""

    def __init__(self, axis: int, num_outputs: int) -> None:
        super().__init__()
        self.axis = axis
        self.num_outputs = num_outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        length = x.shape[self.axis]
        return tuple(torch.split(x, -(-length // self.num_outputs), dim=self.axis))


def _split_18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    has_split = len(node.input_values) > 1 and bool(node.input_values[1])
    if has_split or "num_outputs" not in node.attributes:
        return _delegate("Split", 13)(node, graph)
    module = OnnxSplitOutputs(int(node.attributes.get("axis", 0)), int(node.attributes["num_outputs"]))
    return OperationConverterResult(torch_module=module, onnx_mapping=_trimmed(node, 1))


def _pad_18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    if len(node.input_values) > 3 and node.input_values[3]:
        raise NotImplementedError("Pad with an axes input")
    if node.attributes.get("mode", "constant") == "wrap":
        raise NotImplementedError("Pad with mode='wrap'")
    result = _delegate("Pad", 13)(node, graph)
    return OperationConverterResult(torch_module=result.torch_module, onnx_mapping=_trimmed(node, 3))


def _resize_18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    attrs: dict[str, Any] = node.attributes
    if int(attrs.get("antialias", 0)):
        raise NotImplementedError("Resize with antialias=1")
    if attrs.get("axes"):
        raise NotImplementedError("Resize with axes")
    if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise NotImplementedError(f"Resize with keep_aspect_ratio_policy={attrs['keep_aspect_ratio_policy']!r}")
    if attrs.get("coordinate_transformation_mode") == "half_pixel_symmetric":
        raise NotImplementedError("Resize with coordinate_transformation_mode='half_pixel_symmetric'")
    return _delegate("Resize", 13)(node, graph)


class OnnxReshapeAllowZero(OnnxReshape):
    """Reshape with ``allowzero=1``: a 0 in the shape is an empty dimension, not "copy the input's"."""

    @staticmethod
    def _do_reshape(input_tensor: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return torch.reshape(input_tensor, torch.Size(shape))


def _reshape(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Reshape-14+ with either ``allowzero`` (torch's exporter writes ``allowzero=1``)."""
    module = OnnxReshapeAllowZero() if int(node.attributes.get("allowzero", 0)) else OnnxReshape()
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node=node))


def _gelu_20(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    approximate = str(node.attributes.get("approximate", "none"))
    return OperationConverterResult(torch_module=nn.GELU(approximate=approximate),
                                    onnx_mapping=onnx_mapping_from_node(node=node))


def register() -> list[tuple[str, int]]:
    """Register every converter above that onnx2torch does not have yet; what is registered now (idempotent)."""
    for op, (versions, base) in TYPE_ONLY.items():
        for version in versions:
            _register(op, version, _delegate(op, base))
    _register("AveragePool", 19, _average_pool_19)
    _register("AveragePool", 22, _average_pool_19)
    for op in REDUCE_OPS:
        _register(op, 18, _reduce_18)
    for op in ("ReduceMax", "ReduceMin"):
        _register(op, 20, _reduce_18)  # 20 added boolean inputs
    _register("Split", 18, _split_18)
    for version in (18, 19, 21, 23, 24, 25):
        _register("Pad", version, _pad_18)
    for version in (18, 19):
        _register("Resize", version, _resize_18)
    _register("Gelu", 20, _gelu_20)
    for version in (19, 21, 23, 24, 25):
        _register("Reshape", version, _reshape)
    # onnx2torch's Reshape-14 refuses allowzero=1, which torch writes at opset 18 too: ours handles both.
    _CONVERTER_REGISTRY[OperationDescription("", "Reshape", 14)] = _reshape
    return list(ADDED)


def convertible_ranges(max_opset: int) -> dict[str, tuple[tuple[int, int], ...]]:
    """For each default-domain op onnx2torch (with ours) converts: the model opsets, as inclusive ranges up
    to ``max_opset``, at which it does (the op's schema at that opset has a registered version)."""
    from onnx import defs

    register()
    versions: dict[str, set[int]] = {}
    for desc in _CONVERTER_REGISTRY:
        if desc.domain in ("", "ai.onnx"):
            versions.setdefault(desc.operation_type, set()).add(int(desc.version))
    table: dict[str, tuple[tuple[int, int], ...]] = {}
    for op, registered in sorted(versions.items()):
        ok = []
        for opset in range(1, max_opset + 1):
            try:
                since = defs.get_schema(op, max_inclusive_version=opset, domain="").since_version
            except defs.SchemaError:
                continue
            if since in registered:
                ok.append(opset)
        ranges: list[tuple[int, int]] = []
        for opset in ok:
            if ranges and ranges[-1][1] == opset - 1:
                ranges[-1] = (ranges[-1][0], opset)
            else:
                ranges.append((opset, opset))
        if ranges:
            table[op] = tuple(ranges)
    return table
