"""Safe readers of stored ONNX files: the tensor walk reaches subgraphs; unsafe external data is refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from storage.onnx_files import OnnxFileError, all_graphs, all_tensors, external_data_files, safe_load
from tests.api import builders


def _if_model() -> onnx.ModelProto:
    """An If node whose branches hold one Constant each: two subgraphs, two tensors outside the initializers."""

    def branch(name: str, value: float) -> onnx.GraphProto:
        const = helper.make_node("Constant", [], [f"{name}_out"],
                                 value=numpy_helper.from_array(np.array([value], np.float32), f"{name}_t"))
        return helper.make_graph([const], name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1])])

    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("else", 2.0))
    graph = helper.make_graph(
        [node], "main",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.zeros(2, np.float32), "unused")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_walk_reaches_every_subgraph_and_tensor() -> None:
    model = _if_model()
    assert sorted(g.name for g in all_graphs(model.graph)) == ["else", "main", "then"]
    assert sorted(t.name for t in all_tensors(model)) == ["else_t", "then_t", "unused"]


def _external(folder: Path, location: str = "w.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load_model_from_string(builders.onnx_bytes())
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    if location != "w.bin":
        reloaded = onnx.load(str(path), load_external_data=False)
        for tensor in reloaded.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        path.write_bytes(reloaded.SerializeToString())
    return path


def test_external_data_inside_the_folder_is_loaded(tmp_path: Path) -> None:
    path = _external(tmp_path / "up")
    shallow = safe_load(path, load_external_data=False)
    assert external_data_files(shallow, path.parent) == [(tmp_path / "up" / "w.bin").resolve()]
    full = safe_load(path)
    assert numpy_helper.to_array(full.graph.initializer[1]).shape == (3,)


@pytest.mark.parametrize(
    ("location", "why"),
    [("../w.bin", "leaves the model's folder"), ("/etc/hostname", "absolute"), ("gone.bin", "does not exist")],
)
def test_unsafe_locations_are_refused(tmp_path: Path, location: str, why: str) -> None:
    path = _external(tmp_path / "up", location)
    (tmp_path / "w.bin").write_bytes(b"\0" * 64)
    with pytest.raises(OnnxFileError, match=why):
        safe_load(path)


def test_links_are_refused(tmp_path: Path) -> None:
    path = _external(tmp_path / "up")
    os.symlink(path, tmp_path / "link.onnx")
    with pytest.raises(OnnxFileError, match="not a regular file"):
        safe_load(tmp_path / "link.onnx")
    (tmp_path / "up" / "w.bin").rename(tmp_path / "outside.bin")
    os.symlink(tmp_path / "outside.bin", tmp_path / "up" / "w.bin")
    with pytest.raises(OnnxFileError, match="goes through a link"):
        safe_load(path)



@pytest.mark.parametrize("location", ["../../modelpress.db", "/etc/passwd"])
def test_external_data_in_a_local_function_is_validated(tmp_path: Path, location: str) -> None:
    model = onnx.load_model_from_string(builders.onnx_function_external_bytes(location))
    assert any(t.data_location == TensorProto.EXTERNAL for t in all_tensors(model))
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(OnnxFileError, match="external data location"):
        safe_load(path)


# ----------------------------------------------------------------------------------------------------------
# ONNX archives: torch.onnx.export's model.onnx + model.onnx.data in one zip / tar.gz


def test_an_archive_extracts_to_a_model_whose_external_data_loads(tmp_path: Path) -> None:
    from storage.onnx_files import extract_archive
    from tests import factories_onnx

    src = factories_onnx.opset20_cnn(tmp_path / "src")
    for kind in ("zip", "tar"):
        packed = factories_onnx.archive_of(src, tmp_path / f"m.{kind}", kind, prefix="export/")
        model_path = extract_archive(packed, tmp_path / f"out-{kind}")
        assert model_path == tmp_path / f"out-{kind}" / "export" / "model.onnx"
        model = onnx.load(str(model_path))  # external data resolved next to the model
        assert numpy_helper.to_array(model.graph.initializer[0]).shape == (8, 1, 3, 3)


@pytest.mark.parametrize(
    ("members", "needle"),
    [
        ({"readme.txt": b"hi"}, "no .onnx file"),
        ({"a.onnx": b"x", "b/b.onnx": b"y"}, "2 .onnx files"),
        ({"../model.onnx": b"x"}, "'..' in path"),
        ({"/abs/model.onnx": b"x"}, "absolute path"),
    ],
)
def test_archives_that_are_refused(tmp_path: Path, members: dict[str, bytes], needle: str) -> None:
    from storage.onnx_files import extract_archive
    from tests import factories_onnx

    packed = factories_onnx.pack(dict(members), tmp_path / "m.tar.gz", "tar")
    with pytest.raises(OnnxFileError, match=needle):
        extract_archive(packed, tmp_path / "out")


def test_an_archive_without_the_data_file_or_with_a_link_is_refused(tmp_path: Path) -> None:
    from storage.onnx_files import extract_archive
    from tests import factories_onnx

    src = factories_onnx.opset20_cnn(tmp_path / "src")
    alone = factories_onnx.pack({"model.onnx": src}, tmp_path / "alone.zip")
    with pytest.raises(OnnxFileError, match=r"'model\.onnx\.data' does not exist"):
        extract_archive(alone, tmp_path / "out1")
    from storage.onnx_files import check_archive_layout

    with pytest.raises(OnnxFileError, match=r"'model\.onnx\.data' does not exist"):
        check_archive_layout(alone, tmp_path / "out1b")
    linked = factories_onnx.tar_with_link(tmp_path / "link.tar.gz", src, "/etc/passwd")
    with pytest.raises(OnnxFileError, match="links are not allowed"):
        extract_archive(linked, tmp_path / "out2")
    outside = onnx.load(str(src), load_external_data=False)
    for t in outside.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../src/model.onnx.data"
    bad = factories_onnx.pack({"m/model.onnx": outside.SerializeToString(), "m/model.onnx.data":
                               (src.parent / "model.onnx.data")}, tmp_path / "dotdot.zip")
    with pytest.raises(OnnxFileError, match=r"leaves the model's folder \('\.\.'\)"):
        extract_archive(bad, tmp_path / "out3")
    with pytest.raises(OnnxFileError, match=r"leaves the model's folder \('\.\.'\)"):
        check_archive_layout(bad, tmp_path / "out4")


def test_the_layout_check_writes_the_model_and_only_placeholders_for_the_data(tmp_path: Path) -> None:
    from storage.onnx_files import check_archive_layout
    from tests import factories_onnx

    src = factories_onnx.opset20_cnn(tmp_path / "src")
    packed = factories_onnx.archive_of(src, tmp_path / "m.zip", prefix="export/")
    model_path = check_archive_layout(packed, tmp_path / "out")
    assert model_path.read_bytes() == src.read_bytes()
    data = model_path.with_name("model.onnx.data")
    assert data.stat().st_size == (src.parent / "model.onnx.data").stat().st_size
    assert data.stat().st_blocks == 0  # sparse: nothing inflated


def test_external_data_past_the_end_of_its_file_is_refused(tmp_path: Path) -> None:
    from tests import factories_onnx

    src = factories_onnx.opset20_cnn(tmp_path / "src")
    data = src.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])  # truncated: the later tensors point past its end
    with pytest.raises(OnnxFileError, match="runs past the end of the file"):
        safe_load(src)
