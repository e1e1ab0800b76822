"""ONNX models for the worker: safe loading (storage.onnx_files), copying into a job's workdir, parameter and MAC counts."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from storage import onnx_files
from storage.onnx_files import all_graphs
from worker.core import StepFailed, WorkingModel

# (op_type, input index) of the tensors that hold quantization parameters, not weights.
_QPARAM_SLOTS: dict[str, frozenset[int]] = {
    "QuantizeLinear": frozenset({1, 2}),
    "DequantizeLinear": frozenset({1, 2}),
    "MatMulInteger": frozenset({2, 3}),
    "ConvInteger": frozenset({2, 3}),
    "QLinearConv": frozenset({1, 2, 4, 5, 6, 7}),
    "QLinearMatMul": frozenset({1, 2, 4, 5, 6, 7}),
}


class InvalidModel(StepFailed):
    """The bytes are not a valid, safe ONNX model."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_model", message)


def safe_load(path: Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    """``storage.onnx_files.safe_load`` whose refusal fails the step (InvalidModel)."""
    try:
        return onnx_files.safe_load(path, load_external_data=load_external_data)
    except onnx_files.OnnxFileError as e:
        raise InvalidModel(str(e)) from e


def external_data_files(model: onnx.ModelProto, base_dir: Path) -> list[Path]:
    """``storage.onnx_files.external_data_files`` whose refusal fails the step (InvalidModel)."""
    try:
        return onnx_files.external_data_files(model, base_dir)
    except onnx_files.OnnxFileError as e:
        raise InvalidModel(str(e)) from e


def model_size_bytes(path: Path, model: onnx.ModelProto | None = None) -> int:
    """Bytes on disk of the model file plus its external-data files (``model``: the file, already parsed)."""
    if model is None:
        st = Path(path).stat()
        return _size_cached(str(path), st.st_mtime_ns, st.st_size)
    return Path(path).stat().st_size + sum(
        f.stat().st_size for f in external_data_files(model, Path(path).parent)
    )


@functools.lru_cache(maxsize=64)
def _size_cached(path: str, mtime_ns: int, size: int) -> int:
    # Parsing a large model costs ~0.1 s a time; passes ask for the size of the same file repeatedly.
    model = onnx.load(path, load_external_data=False)
    return size + sum(f.stat().st_size for f in external_data_files(model, Path(path).parent))


def _copy(src: Path, dst: Path, *, move: bool = False) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    if move:
        os.replace(src, dst)  # a file this job extracted itself: no second copy of the weights
    else:
        shutil.copyfile(src, dst)


def tensor_specs(values: Sequence[onnx.ValueInfoProto]) -> list[dict[str, Any]]:
    """``[{name, dtype, shape}]`` for graph inputs or outputs; dynamic dims are their names (or None)."""
    specs = []
    for v in values:
        tt = v.type.tensor_type
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else None
        shape: list[int | str | None] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        ]
        specs.append({"name": v.name, "dtype": dtype, "shape": shape})
    return specs


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that are real inputs (not initializers listed as inputs, as old exporters do)."""
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


@functools.lru_cache(maxsize=64)
def _interface_cached(
    path: str, mtime_ns: int, size: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    model = onnx.load(path, load_external_data=False)
    return tensor_specs(graph_inputs(model)), tensor_specs(model.graph.output)


def interface(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(inputs, outputs)`` as ``[{name, dtype, shape}]`` of the ONNX file at ``path`` (cached per file version)."""
    st = Path(path).stat()
    inputs, outputs = _interface_cached(str(path), st.st_mtime_ns, st.st_size)
    return copy.deepcopy(inputs), copy.deepcopy(outputs)


def input_dtypes(path: Path) -> dict[str, np.dtype[Any]]:
    """The numpy dtype each graph input of the ONNX file at ``path`` expects."""
    return {s["name"]: np.dtype(s["dtype"]) for s in interface(path)[0] if s["dtype"]}


def extract_archive(path: Path, workdir: Path) -> Path:
    """The model file of an uploaded ONNX archive, extracted under ``workdir`` and validated (InvalidModel if not)."""
    import tempfile

    workdir.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix="onnx-archive-", dir=workdir))
    try:
        return onnx_files.extract_archive(Path(path), dest)
    except onnx_files.OnnxFileError as e:
        raise InvalidModel(f"ONNX archive rejected: {e}") from e


def load(path: Path, meta: dict[str, Any], workdir: Path) -> WorkingModel:
    """The uploaded ONNX model at ``path`` (a file, or a zip/tar.gz with its external data), validated and
    copied (with its external data) into ``workdir``."""
    path = Path(path)
    extracted = onnx_files.is_archive(path)
    if extracted:
        path = extract_archive(path, workdir)
    model = safe_load(path, load_external_data=False)
    workdir.mkdir(parents=True, exist_ok=True)
    dst = workdir / "model.onnx"
    base = path.parent.resolve()
    externals = external_data_files(model, path.parent)
    _copy(path, dst, move=extracted)
    for ext in externals:
        _copy(ext, workdir / ext.relative_to(base), move=extracted)
    inputs = graph_inputs(model)
    return WorkingModel(
        form="onnx",
        origin="onnx",
        input_names=[v.name for v in inputs],
        output_names=[v.name for v in model.graph.output],
        onnx_path=dst,
        meta={
            **meta,
            "inputs": tensor_specs(inputs),
            "outputs": tensor_specs(model.graph.output),
            "opset": opset_version(model),
        },
    )


def opset_version(model: onnx.ModelProto) -> int | None:
    """The default-domain opset the model imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def _slot_inputs(model: onnx.ModelProto, slots_by_op: Mapping[str, frozenset[int]]) -> set[str]:
    """The names of the tensors fed into the given (op_type, input index) slots, in every (sub)graph."""
    names: set[str] = set()
    for graph in all_graphs(model.graph):
        for node in graph.node:
            slots = slots_by_op.get(node.op_type)
            if slots:
                names.update(n for i, n in enumerate(node.input) if i in slots and n)
    return names


_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})
_QUANT_TYPES = frozenset({TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4})
# (op_type, input index) where an integer tensor is a quantized weight (or bias)
_QWEIGHT_SLOTS: dict[str, frozenset[int]] = {
    "DequantizeLinear": frozenset({0}),
    "MatMulInteger": frozenset({1}),
    "ConvInteger": frozenset({1}),
    "QLinearConv": frozenset({3, 8}),
    "QLinearMatMul": frozenset({0, 3}),
}


def count_params(model: onnx.ModelProto) -> int:
    """Number of weight elements, comparable before and after quantization.

    Counts floating-point and 8/4-bit initializers and Constant tensors with more than one element, and
    int32 tensors that are quantized biases; not scales, zero points, shapes or indices.
    """
    qparams = _slot_inputs(model, _QPARAM_SLOTS)
    qweights = _slot_inputs(model, _QWEIGHT_SLOTS)
    total = 0
    for graph in all_graphs(model.graph):
        tensors = list(graph.initializer)
        tensors += [
            a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
        ]
        for t in tensors:
            n = math.prod(t.dims)
            if (
                n <= 1
                or t.name in qparams
                or (t.name.endswith(("_scale", "_zero_point")) and len(t.dims) <= 1)
            ):
                continue
            if t.data_type in _FLOAT_TYPES or t.data_type in _QUANT_TYPES or t.name in qweights:
                total += n
    return total


def _shape_map(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    g = model.graph
    for v in [*g.input, *g.value_info, *g.output]:
        tt = v.type.tensor_type
        if tt.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    for t in g.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def _known(shape: list[int | None] | None) -> list[int] | None:
    if shape is None or any(d is None for d in shape):
        return None
    return [int(d) for d in shape if d is not None]


def _conv_macs(out: list[int], weight: list[int]) -> int:
    # out [N, Cout, *spatial]; weight [Cout, Cin/g, *k]
    return math.prod(out) * math.prod(weight[1:])


def _conv_transpose_macs(inp: list[int], weight: list[int]) -> int:
    # in [N, Cin, *spatial]; weight [Cin, Cout/g, *k]: each input element scatters into Cout/g * k outputs
    return math.prod(inp) * math.prod(weight[1:])


def _matmul_macs(a: list[int], out: list[int]) -> int:
    k = a[-1] if a else 1
    return math.prod(out) * k


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> int | None:
    def s(i: int) -> list[int] | None:
        return _known(shapes.get(node.input[i])) if i < len(node.input) and node.input[i] else None

    out = _known(shapes.get(node.output[0])) if node.output else None
    op = node.op_type
    if op in ("Conv", "ConvInteger"):
        w = s(1)
        return _conv_macs(out, w) if out and w else None
    if op == "QLinearConv":
        w = s(3)
        return _conv_macs(out, w) if out and w else None
    if op == "ConvTranspose":
        x, w = s(0), s(1)
        return _conv_transpose_macs(x, w) if x and w else None
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = s(0)
        return _matmul_macs(a, out) if a is not None and out is not None else None
    if op == "Gemm":
        a = s(0)
        if a is None or out is None or len(a) != 2:
            return None
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        k = a[0] if trans_a else a[1]
        return math.prod(out) * k
    return None


_LEAN_LIMIT = 4096
_DATA_FIELDS = (
    "raw_data",
    "float_data",
    "int32_data",
    "int64_data",
    "double_data",
    "uint64_data",
    "string_data",
)

MAC_OPS = frozenset(
    {
        "Conv",
        "ConvInteger",
        "QLinearConv",
        "ConvTranspose",
        "MatMul",
        "MatMulInteger",
        "QLinearMatMul",
        "Gemm",
    }
)


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node follows its producers (shape inference walks in order)."""
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # a cycle or outer-scope inputs: keep the remaining order
            ordered.extend(rest)
            break
        pending = rest
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def count_macs(path: Path, input_shapes: Mapping[str, Sequence[int]] | None = None) -> int | None:
    """MACs of Conv/ConvTranspose/Gemm/MatMul (and their quantized forms) for one sample (batch 1).

    Dynamic input dims are replaced by ``input_shapes`` (a sample's shape; its batch dim is set to 1),
    remaining dynamic dims by 1. None when shape inference cannot size any such node.
    """
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        if math.prod(t.dims) > _LEAN_LIMIT:  # shape inference needs dims only; keep small constants
            for name in _DATA_FIELDS:
                t.ClearField(name)
    given = dict(input_shapes or {})
    for v in graph_inputs(model):
        dims = v.type.tensor_type.shape.dim
        sample = list(given.get(v.name, []))
        for i, d in enumerate(dims):
            if d.HasField("dim_value"):
                continue
            value = 1 if i == 0 else (int(sample[i]) if i < len(sample) else 1)
            d.Clear()
            d.dim_value = value
    _topological_sort(model.graph)
    # value_info from the exporter may carry stale symbolic dims; let inference recompute them.
    del model.graph.value_info[:]
    for out in model.graph.output:
        for d in out.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
    best: tuple[int, int, int] | None = None  # (sized nodes, MAC nodes, total)
    for infer in (_onnx_inference, _symbolic_inference):
        try:
            inferred = infer(model)
        except Exception:
            continue
        counted = _sum_macs(inferred)
        if best is None or counted[0] > best[0]:
            best = counted
        if best[0] == best[1]:  # every MAC node sized: no need for the slower symbolic inference
            break
    return best[2] if best and best[0] else None


def _onnx_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)


def _symbolic_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's symbolic shape inference: sizes transformer graphs (Slice/Expand chains) that ONNX's leaves open."""
    import tempfile

    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    with tempfile.TemporaryDirectory(prefix="mp-shapes-") as scratch, scratch_cwd(Path(scratch)):
        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)


@contextlib.contextmanager
def scratch_cwd(folder: Path) -> Iterator[None]:
    """Run with ``folder`` as the working directory: ORT's symbolic shape inference drops a debug model
    and ``<uuid>.data`` files into the CWD when it cannot finish. Process-wide; a worker runs one job at a time.
    """
    folder.mkdir(parents=True, exist_ok=True)
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _sum_macs(inferred: onnx.ModelProto) -> tuple[int, int, int]:
    shapes = _shape_map(inferred)
    total = sized = nodes = 0
    for node in inferred.graph.node:
        if node.op_type in MAC_OPS:
            nodes += 1
            macs = _node_macs(node, shapes)
            if macs is not None:
                total += macs
                sized += 1
    return sized, nodes, total
