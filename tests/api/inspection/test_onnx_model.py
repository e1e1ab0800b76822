"""ONNX inspection: the interface, opsets and parameters of a single file; what is refused and why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from api.inspection import InspectionError, inspect_onnx
from tests.api import builders


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "up-staged"  # a staged upload has no suffix
    path.write_bytes(data)
    return path


def test_interface_opsets_and_parameters(tmp_path: Path) -> None:
    meta = inspect_onnx(_write(tmp_path, builders.onnx_bytes(in_features=4, out_features=3)))
    assert meta["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}]
    assert meta["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}]
    assert meta["parameters"] == 15 and meta["nodes"] == 2 and meta["graph_name"] == "tiny"
    assert meta["opset"] == 17 and meta["opsets"] == {"ai.onnx": 17} and meta["ir_version"] == 8
    assert meta["producer"] == "tests"


def test_initializers_listed_as_inputs_are_not_inputs_and_unknown_dims_are_none(tmp_path: Path) -> None:
    model = onnx.load_model_from_string(builders.onnx_bytes())
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3]))  # old exporters
    model.graph.output[0].type.tensor_type.shape.dim[0].Clear()  # neither a value nor a name
    meta = inspect_onnx(_write(tmp_path, model.SerializeToString()))
    assert [i["name"] for i in meta["inputs"]] == ["x"]
    assert meta["outputs"][0]["shape"] == [None, 3]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\xff\xfe not protobuf" * 20, "not an ONNX model"),
        (b"", "no graph or no opset import"),
        (builders.onnx_external_bytes(), "references external data"),
    ],
)
def test_refusals(tmp_path: Path, data: bytes, needle: str) -> None:
    with pytest.raises(InspectionError, match=needle):
        inspect_onnx(_write(tmp_path, data))


def test_a_graph_the_checker_rejects(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["nowhere"], ["y"])],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InspectionError, match="the ONNX model is invalid"):
        inspect_onnx(_write(tmp_path, model.SerializeToString()))


def test_an_archive_with_external_data_is_inspected(tmp_path: Path) -> None:
    from tests import factories_onnx

    src = factories_onnx.opset20_cnn(tmp_path / "src")
    packed = factories_onnx.archive_of(src, tmp_path / "up-staged", "tar", prefix="export/")
    meta = inspect_onnx(packed)
    assert meta["archive"] == "tar" and meta["model_file"] == "export/model.onnx"
    assert meta["external_data"] == ["model.onnx.data"]
    assert meta["opset"] == 20 and meta["parameters"] == 8 * 9 + 8 + 16 * 72 + 16 + 160 + 10 + 2 + 2
    assert meta["op_types"]["AveragePool"] == 1
    assert meta["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "up-staged"]  # the scratch folder is gone


def test_a_single_file_with_external_data_names_the_archive_format(tmp_path: Path) -> None:
    with pytest.raises(InspectionError, match=r"as one zip or tar\.gz \(format=onnx\)"):
        inspect_onnx(_write(tmp_path, builders.onnx_external_bytes()))


def test_a_loop_with_a_huge_constant_trip_count_is_refused(tmp_path: Path) -> None:
    import onnx

    from tests.factories_onnx import looping_model

    huge = tmp_path / "huge.onnx"
    onnx.save(looping_model(2**40), huge)
    with pytest.raises(InspectionError, match=r"runs 1099511627776 times; at most 1000000 iterations"):
        inspect_onnx(huge)
    fine = tmp_path / "fine.onnx"
    onnx.save(looping_model(1000), fine)
    assert inspect_onnx(fine)["op_types"] == {"Loop": 1, "MatMul": 1}
    computed = tmp_path / "computed.onnx"  # only running it shows how long it loops: the worker bounds it
    onnx.save(looping_model(2**40, constant=False), computed)
    assert inspect_onnx(computed)["op_types"] == {"Loop": 1, "MatMul": 1, "Mul": 1}


def test_nested_loops_count_their_trips_together(tmp_path: Path) -> None:
    import onnx
    from onnx import helper

    from tests.factories_onnx import looping_model

    model = looping_model(2000)
    inner = model.graph.node[0]  # Loop(trips=2000) inside a Loop of 1000 trips: 2,000,000 in all
    outer_body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), inner], "outer_body",
        [helper.make_tensor_value_info("j", onnx.TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("c_out", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("looped", onnx.TensorProto.FLOAT, None)])
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1000, np.int64), "outer_trips"))
    model.graph.node[0].CopyFrom(helper.make_node("Loop", ["outer_trips", "cond", "input"], ["looped"], body=outer_body))
    path = tmp_path / "nested.onnx"
    onnx.save(model, path)
    with pytest.raises(InspectionError, match=r"runs 2000 times \(2000000 with the Loops around it\)"):
        inspect_onnx(path)
