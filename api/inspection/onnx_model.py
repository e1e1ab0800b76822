"""Inspection of an ONNX model (a single file, or a zip/tar.gz with its external data): inputs, outputs,
opsets, IR version, producer, parameters, operator counts."""

from __future__ import annotations

import math
import tempfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.inspection.common import InspectionError

if TYPE_CHECKING:
    import onnx


def _dim_list(type_proto: Any) -> list[int | str | None]:
    shape: list[int | str | None] = []
    tensor = type_proto.tensor_type
    if not tensor.HasField("shape"):
        return shape
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        elif dim.HasField("dim_param") and dim.dim_param:
            shape.append(str(dim.dim_param))
        else:
            shape.append(None)
    return shape


def _dtype_name(elem_type: int) -> str:
    import onnx

    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type).name)
    except (KeyError, ValueError, TypeError):
        return str(onnx.TensorProto.DataType.Name(elem_type)).lower()


def _value_info(value: Any) -> dict[str, Any]:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return {"name": value.name, "dtype": str(kind or "unknown"), "shape": []}
    return {"name": value.name, "dtype": _dtype_name(value.type.tensor_type.elem_type), "shape": _dim_list(value.type)}


def inspect_onnx(path: Path) -> dict[str, Any]:
    """Inputs, outputs, opset, IR version, producer and parameter count of an ONNX file or ONNX archive."""
    from api.inspection.wrong_format import wrong_format_hint
    from storage import onnx_files

    hint = wrong_format_hint(path, "onnx")  # a torch.save pickle, a Hugging Face folder: say what to do
    if hint:
        raise InspectionError(hint)
    if onnx_files.is_archive(path):
        return _inspect_archive(path)
    return _inspect_file(path)


def _inspect_archive(path: Path) -> dict[str, Any]:
    """An ONNX file with its external data in a zip or tar.gz: its layout rebuilt in a scratch folder (the model
    file, sparse placeholders for the rest) and checked there."""
    import onnx

    from storage import onnx_files

    with tempfile.TemporaryDirectory(prefix="mp-onnx-", dir=path.parent) as scratch:
        try:
            model_path = onnx_files.check_archive_layout(path, Path(scratch))
            model = onnx.load_model(str(model_path), load_external_data=False)
            externals = onnx_files.external_data_files(model, model_path.parent)
        except onnx_files.OnnxFileError as exc:
            raise InspectionError(str(exc)) from exc
        check_loops(model.graph)
        root = model_path.parent.resolve()
        return {
            **_onnx_meta(model),
            "archive": "zip" if zipfile.is_zipfile(path) else "tar",
            "model_file": model_path.relative_to(Path(scratch)).as_posix(),
            "external_data": [f.relative_to(root).as_posix() for f in externals],
        }


def _inspect_file(path: Path) -> dict[str, Any]:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, TypeError, UnicodeDecodeError) as exc:
        raise InspectionError(f"the file is not an ONNX model (protobuf parse failed: {exc})") from exc
    except Exception as exc:
        raise InspectionError(f"the file is not an ONNX model ({type(exc).__name__})") from exc
    if not model.HasField("graph") or not model.opset_import:
        raise InspectionError("the file is not an ONNX model (no graph or no opset import)")
    from storage.onnx_files import all_tensors  # onnx only, no torch

    external = [t.name for t in all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise InspectionError(
            f"tensor {external[0]!r} references external data, which a single-file upload cannot carry; "
            "save the model with all tensors inside the file (onnx.save(..., save_as_external_data=False)) "
            "or upload the .onnx file together with its external-data file(s) as one zip or tar.gz "
            "(format=onnx)"
        )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InspectionError(f"the ONNX model is invalid: {first}") from exc
    check_loops(model.graph)
    return _onnx_meta(model)


# A Loop whose constant trip count (times those of the Loops around it) passes this would pin a worker in
# one run; a trip count computed at run time is bounded by the worker's run budget (worker/ort_guard.py).
MAX_LOOP_TRIPS = 1_000_000


def _scalar_ints(graph: Any) -> dict[str, int]:
    """The graph's one-element integer constants (initializers and Constant nodes), by name."""
    from onnx import numpy_helper

    found: dict[str, int] = {}
    tensors = [(t.name, t) for t in graph.initializer]
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            tensors += [(node.output[0], a.t) for a in node.attribute if a.name == "value" and a.HasField("t")]
    for name, tensor in tensors:
        if math.prod(tensor.dims) == 1 and tensor.data_type in (6, 7):  # INT32, INT64
            try:
                found[name] = int(numpy_helper.to_array(tensor).reshape(-1)[0])
            except Exception:  # an unreadable constant: the checker already accepted the file; skip it
                continue
    return found


def check_loops(graph: Any, outer: dict[str, int] | None = None, trips_around: int = 1) -> None:
    """InspectionError when a Loop's constant trip count (with those of enclosing Loops) passes MAX_LOOP_TRIPS."""
    consts = {**(outer or {}), **_scalar_ints(graph)}
    for node in graph.node:
        trips = trips_around
        if node.op_type == "Loop" and node.input and node.input[0] in consts:
            trips = trips_around * max(1, consts[node.input[0]])
            if trips > MAX_LOOP_TRIPS:
                raise InspectionError(
                    f"Loop node {node.name or node.output[0]!r} runs {consts[node.input[0]]} times"
                    + (f" ({trips} with the Loops around it)" if trips_around > 1 else "")
                    + f"; at most {MAX_LOOP_TRIPS} iterations of a Loop with a constant trip count are accepted")
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                check_loops(sub, consts, trips)


def _onnx_meta(model: onnx.ModelProto) -> dict[str, Any]:
    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    params = sum(math.prod(t.dims) for t in graph.initializer)
    params += sum(math.prod(s.dims) for s in graph.sparse_initializer)
    opsets = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    return {
        "inputs": [_value_info(v) for v in graph.input if v.name not in init_names],
        "outputs": [_value_info(v) for v in graph.output],
        "opset": opsets.get("ai.onnx"),
        "opsets": opsets,
        "ir_version": int(model.ir_version),
        "parameters": int(params),
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p) or None,
        "graph_name": graph.name or None,
        "nodes": len(graph.node),
        # How many nodes of each op type the main graph has: clients pick an INT8 mode from it (Conv vs MatMul).
        "op_types": dict(sorted(Counter(n.op_type for n in graph.node).items())),
    }
