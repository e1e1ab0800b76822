"""Weight-only INT8 that ONNX Runtime folds at load (mode ``int8_folded``): each constant float weight of a
Conv, ConvTranspose, Gemm or MatMul is stored as int8 codes and read through ``Cast(to float) -> Mul(scale)``.

ORT's constant folding (on at its default optimization level) evaluates that Cast and Mul of initializers
when the session is created, so the session runs the float graph's kernels at float speed while the file holds
a quarter of the bytes. A ``DequantizeLinear`` in the same place is not folded under default session options
(ORT keeps it for its QDQ fusions: the depthwise and squeeze-excitation blocks of a PP-LCNet then ran as
slowly as static QDQ), hence the plain ops. Symmetric round-to-nearest, one scale per output channel (or per
tensor with ``per_channel: false``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.spec import QuantizeStep
from worker.core import PassContext, StepFailed
from worker.passes.quantizers.files import is_large, name_unnamed_nodes, node_attr, save, unique_path

if TYPE_CHECKING:
    import onnx

FOLDED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FLOAT = 1  # onnx.TensorProto.FLOAT
# Weights smaller than this stay float: their scales would outweigh the bytes saved (biases, 1-D tensors).
MIN_ELEMENTS = 64


def output_axis(node: onnx.NodeProto) -> int:
    """The weight axis that indexes the node's output channels: Conv ``[out, in/g, k...]`` 0, ConvTranspose
    ``[in, out/g, k...]`` 1, MatMul ``[in, out]`` 1, Gemm 0 with ``transB`` else 1."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if node_attr(node, "transB", 0) else 1
    return 1


def quantize_array(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes (-127..127) of ``w`` and their float32 scale, one per slice along ``axis`` shaped to
    broadcast against ``w`` (``axis`` None: one scale)."""
    w = w.astype(np.float32)
    if axis is None:
        amax = np.asarray(np.abs(w).max(), dtype=np.float32).reshape((1,) * w.ndim)
    else:
        amax = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis), keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return codes, scale


def quantize_folded(src: Path, p: QuantizeStep, ctx: PassContext) -> tuple[Path, dict[str, Any]]:
    """Write ``src`` with its Conv/Gemm/MatMul weights as int8 + Cast + Mul; returns the path and the metrics."""
    import onnx

    large = is_large(src)
    m = onnx.load(str(src))
    name_unnamed_nodes(m)
    done, excluded = fold_weights(m, p)
    if not done:
        raise StepFailed("nothing_to_quantize", "no Conv, ConvTranspose, Gemm or MatMul with a constant float "
                         "weight left to quantize" + (f" ({len(excluded)} excluded)" if excluded else ""))
    out = unique_path(ctx.workdir, f"quantized-{p.mode}")
    save(m, out, large)
    return out, {"weights": dict(sorted(Counter(done.values()).items())), "per_channel": p.per_channel,
                 "excluded": excluded}


def fold_weights(m: onnx.ModelProto, p: QuantizeStep) -> tuple[dict[str, str], list[dict[str, str]]]:
    """In place: each eligible weight becomes int8 codes and a scale, read through Cast + Mul under its old
    name (so every consumer is unchanged). Returns {weight: op type} done and the nodes left float, why."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in m.graph.initializer}
    overridable = {i.name for i in m.graph.input}  # an initializer listed as an input is not a constant
    users = Counter(i for n in m.graph.node for i in n.input)
    done: dict[str, str] = {}
    excluded: list[dict[str, str]] = []
    prologue: list[onnx.NodeProto] = []
    for node in m.graph.node:
        if node.op_type not in FOLDED_OPS or len(node.input) < 2:
            continue
        name = node.input[1]
        t = inits.get(name)
        if t is None or t.data_type != _FLOAT or name in done:
            continue  # an activation input, an fp16 or already-quantized weight
        reason = ("excluded" if node.name in p.nodes_to_exclude or node.op_type in p.op_types_to_exclude
                  else "an overridable graph input" if name in overridable
                  else "shared with another node" if users[name] > 1
                  else "too small" if int(np.prod(t.dims)) < MIN_ELEMENTS
                  else "not 2-D" if node.op_type in ("Gemm", "MatMul") and len(t.dims) != 2 else None)
        if reason is not None:
            excluded.append({"node": node.name, "op_type": node.op_type, "reason": reason})
            continue
        codes, scale = quantize_array(numpy_helper.to_array(t), output_axis(node) if p.per_channel else None)
        m.graph.initializer.remove(t)
        m.graph.initializer.extend([numpy_helper.from_array(codes, f"{name}_int8"),
                                    numpy_helper.from_array(scale, f"{name}_scale")])
        prologue += [
            onnx.helper.make_node("Cast", [f"{name}_int8"], [f"{name}_int8_float"], name=f"{name}_Cast",
                                  to=onnx.TensorProto.FLOAT),
            onnx.helper.make_node("Mul", [f"{name}_int8_float", f"{name}_scale"], [name], name=f"{name}_Mul"),
        ]
        done[name] = node.op_type
    nodes = [*prologue, *m.graph.node]  # the dequantizing pairs first: the graph stays topologically sorted
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return done, excluded
