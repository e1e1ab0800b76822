"""Which ONNX operators the worker can turn into PyTorch (onnx2torch plus worker/onnx2torch_ops.py), by opset.

A pure table, so the API can refuse at submit time a training or pruning job on an uploaded ONNX graph
the worker could not convert, naming the operator. tests/models/test_convertible.py asserts it equals
what the worker's registry converts (``worker.onnx2torch_ops.convertible_ranges``); regenerate it from
there when onnx2torch or the converters change.
"""

from __future__ import annotations

from collections.abc import Iterable

# The highest opset the table was computed for (onnx.defs.onnx_opset_version() of the installed onnx).
MAX_OPSET = 28
# Default-domain op type -> the model opsets (inclusive ranges) at which it converts.
CONVERTIBLE: dict[str, tuple[tuple[int, int], ...]] = {
    'Abs': ((6, 28),),
    'Acos': ((7, 28),),
    'Add': ((1, 28),),
    'And': ((1, 28),),
    'ArgMax': ((11, 28),),
    'ArgMin': ((11, 28),),
    'Asin': ((7, 28),),
    'Atan': ((7, 28),),
    'AveragePool': ((7, 28),),
    'BatchNormalization': ((9, 28),),
    'Cast': ((9, 27),),
    'Ceil': ((6, 28),),
    'Celu': ((12, 27),),
    'Clip': ((6, 28),),
    'Concat': ((4, 28),),
    'Constant': ((9, 28),),
    'ConstantOfShape': ((9, 28),),
    'Conv': ((1, 28),),
    'ConvTranspose': ((1, 28),),
    'Cos': ((7, 28),),
    'CumSum': ((11, 28),),
    'DepthToSpace': ((11, 27),),
    'Div': ((1, 28),),
    'Dropout': ((10, 28),),
    'Einsum': ((12, 27),),
    'Elu': ((6, 28),),
    'Equal': ((7, 28),),
    'Erf': ((9, 28),),
    'Exp': ((6, 28),),
    'Expand': ((8, 28),),
    'EyeLike': ((9, 28),),
    'Flatten': ((9, 28),),
    'Floor': ((6, 28),),
    'Gather': ((1, 28),),
    'GatherElements': ((11, 28),),
    'GatherND': ((11, 28),),
    'Gelu': ((20, 28),),
    'Gemm': ((9, 28),),
    'GlobalAveragePool': ((1, 28),),
    'Greater': ((7, 28),),
    'GreaterOrEqual': ((12, 28),),
    'HardSigmoid': ((1, 28),),
    'HardSwish': ((14, 28),),
    'Identity': ((1, 28),),
    'InstanceNormalization': ((1, 28),),
    'IsInf': ((10, 28),),
    'IsNaN': ((13, 28),),
    'LRN': ((1, 28),),
    'LayerNormalization': ((17, 28),),
    'LeakyRelu': ((1, 28),),
    'Less': ((7, 28),),
    'LessOrEqual': ((12, 28),),
    'Log': ((6, 28),),
    'LogSoftmax': ((1, 28),),
    'MatMul': ((1, 28),),
    'Max': ((8, 28),),
    'MaxPool': ((8, 28),),
    'Mean': ((8, 28),),
    'Min': ((8, 28),),
    'Mod': ((10, 27),),
    'Mul': ((1, 28),),
    'Neg': ((1, 28),),
    'NonMaxSuppression': ((10, 28),),
    'NonZero': ((13, 28),),
    'Not': ((1, 28),),
    'Or': ((1, 28),),
    'PRelu': ((7, 28),),
    'Pad': ((2, 28),),
    'Pow': ((1, 28),),
    'Range': ((11, 26),),
    'Reciprocal': ((1, 28),),
    'ReduceL1': ((1, 28),),
    'ReduceL2': ((1, 28),),
    'ReduceLogSum': ((1, 27),),
    'ReduceLogSumExp': ((1, 27),),
    'ReduceMax': ((1, 28),),
    'ReduceMean': ((1, 28),),
    'ReduceMin': ((1, 28),),
    'ReduceProd': ((1, 28),),
    'ReduceSum': ((1, 28),),
    'ReduceSumSquare': ((1, 28),),
    'Relu': ((6, 28),),
    'Reshape': ((5, 28),),
    'Resize': ((10, 28),),
    'RoiAlign': ((10, 21),),
    'Round': ((11, 28),),
    'ScatterND': ((11, 17),),
    'Selu': ((6, 28),),
    'Shape': ((1, 28),),
    'Sigmoid': ((1, 28),),
    'Sign': ((9, 28),),
    'Sin': ((7, 28),),
    'Slice': ((10, 28),),
    'Softmax': ((1, 28),),
    'Softplus': ((1, 28),),
    'Softsign': ((1, 28),),
    'Split': ((2, 28),),
    'Sqrt': ((1, 28),),
    'Squeeze': ((1, 28),),
    'Sub': ((1, 28),),
    'Sum': ((8, 28),),
    'Tan': ((7, 28),),
    'Tanh': ((6, 28),),
    'Tile': ((6, 28),),
    'TopK': ((1, 23),),
    'Transpose': ((1, 28),),
    'Unsqueeze': ((1, 28),),
    'Where': ((9, 28),),
    'Xor': ((1, 28),),
}


def unconvertible(op_types: Iterable[str], opset: int | None) -> list[str]:
    """The op types (sorted) of a default-domain graph at ``opset`` the worker cannot convert to torch."""
    if opset is None:
        return []
    return sorted(
        op for op in set(op_types)
        if not any(lo <= opset <= hi for lo, hi in CONVERTIBLE.get(op, ()))
    )


def newest_convertible_opset(op_types: Iterable[str], below: int) -> int | None:
    """The highest opset under ``below`` at which every op in ``op_types`` converts, or None."""
    ops = set(op_types)
    for opset in range(min(below - 1, MAX_OPSET), 0, -1):
        if not unconvertible(ops, opset):
            return opset
    return None
