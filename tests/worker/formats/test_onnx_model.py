"""ONNX loading: copies into the workdir, rejects unsafe external data, counts params and MACs exactly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.worker.conftest import DigitsFiles
from worker.formats import load_model
from worker.formats.onnx_model import InvalidModel, count_macs, count_params, model_size_bytes, safe_load


def _external_model(folder: Path, location: str = "weights.bin") -> Path:
    """y = x @ W with W (16x4) stored in an external file next to the model."""
    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(16, 4), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location=location, size_threshold=0)
    return path


def _relocate(path: Path, location: str) -> None:
    """Point the model's external tensor at ``location`` without touching any data file."""
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    path.write_bytes(model.SerializeToString())


def test_load_copies_the_model_and_reads_its_interface(digits_mlp: DigitsFiles, tmp_path: Path) -> None:
    wm = load_model(digits_mlp.model, "onnx", {"name": "mlp"}, tmp_path / "work")
    assert wm.form == "onnx" and wm.origin == "onnx"
    assert wm.input_names == ["pixels"] and wm.output_names == ["logits"]
    assert wm.onnx_path is not None and wm.onnx_path.parent == tmp_path / "work"
    assert wm.onnx_path.read_bytes() == digits_mlp.model.read_bytes()
    assert wm.meta["inputs"] == [{"name": "pixels", "dtype": "float32", "shape": ["batch", 64]}]
    assert wm.meta["opset"] == 17 and wm.meta["name"] == "mlp"


def test_external_data_inside_the_folder_loads_and_is_copied(tmp_path: Path) -> None:
    path = _external_model(tmp_path / "up")
    model = safe_load(path)
    assert numpy_helper.to_array(model.graph.initializer[0])[3, 2] == 14.0
    assert model_size_bytes(path) == path.stat().st_size + 64 * 4
    wm = load_model(path, "onnx", {}, tmp_path / "work")
    assert (tmp_path / "work" / "weights.bin").read_bytes() == (tmp_path / "up" / "weights.bin").read_bytes()
    assert wm.onnx_path is not None
    assert numpy_helper.to_array(safe_load(wm.onnx_path).graph.initializer[0]).sum() == np.arange(64).sum()


@pytest.mark.parametrize(
    ("location", "why"),
    [("../secret.bin", "'..'"), ("/etc/passwd", "absolute"), ("missing.bin", "does not exist")],
)
def test_unsafe_external_locations_are_rejected(tmp_path: Path, location: str, why: str) -> None:
    path = _external_model(tmp_path / "up")
    (tmp_path / "secret.bin").write_bytes(b"\0" * 256)
    _relocate(path, location)
    with pytest.raises(InvalidModel, match=why) as info:
        safe_load(path)
    assert info.value.code == "invalid_model"


def test_external_data_through_a_link_is_rejected(tmp_path: Path) -> None:
    path = _external_model(tmp_path / "up")
    outside = tmp_path / "outside.bin"
    (tmp_path / "up" / "weights.bin").rename(outside)
    os.symlink(outside, tmp_path / "up" / "weights.bin")
    with pytest.raises(InvalidModel, match="link"):
        safe_load(path)


def test_garbage_and_invalid_graphs_are_rejected(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(InvalidModel, match=r"not an ONNX model|checker"):
        safe_load(junk)
    # a node reading a tensor nobody produces fails onnx.checker
    graph = helper.make_graph(
        [helper.make_node("Relu", ["nowhere"], ["y"])],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    with pytest.raises(InvalidModel, match="checker"):
        safe_load(bad)


def test_count_params_of_the_mlp(digits_mlp: DigitsFiles) -> None:
    model = onnx.load(str(digits_mlp.model))
    assert count_params(model) == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10


def test_count_macs_substitutes_dynamic_dims_from_the_sample(tmp_path: Path) -> None:
    """Conv (dynamic H, W) -> ConvTranspose -> flatten -> Gemm -> MatMul, against hand-computed MACs."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1], group=1),  # 3->8, 3x3, same size
        helper.make_node("ConvTranspose", ["c", "tw"], ["t"], strides=[2, 2]),  # 8->4, 2x2, doubles H, W
        helper.make_node("GlobalAveragePool", ["t"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "gw"], ["g"], transB=1),  # 4 -> 6
        helper.make_node("MatMul", ["g", "mw"], ["y"]),  # 6 -> 5
    ]
    graph = helper.make_graph(
        nodes,
        "macs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [init("cw", 8, 3, 3, 3), init("tw", 8, 4, 2, 2), init("gw", 6, 4), init("mw", 6, 5)],
    )
    path = tmp_path / "macs.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    h, w = 10, 12
    conv = 8 * h * w * 3 * 3 * 3
    convt = 8 * h * w * 4 * 2 * 2
    expected = conv + convt + 4 * 6 + 6 * 5
    # the sample's batch dim (32) is replaced by 1
    assert count_macs(path, {"x": [32, 3, h, w]}) == expected
    assert count_macs(path, {"x": [1, 3, 2 * h, w]}) == expected + conv + convt


def test_count_macs_of_a_tiny_bert_with_dynamic_batch_and_sequence(tmp_path: Path) -> None:
    """Transformer graphs need ORT's symbolic shape inference (ONNX's leaves Slice chains unsized)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    hidden, inter, layers, heads, seq = 32, 64, 2, 4, 12
    bert = BertModel(
        BertConfig(
            vocab_size=100,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=inter,
            max_position_embeddings=32,
        )
    ).eval()

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    path = tmp_path / "bert.onnx"
    ids = torch.ones(2, 5, dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(
        LastHidden(),
        (ids, ids),
        str(path),
        dynamo=False,
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
        opset_version=17,
    )
    projections = seq * (4 * hidden * hidden + 2 * hidden * inter)  # q, k, v, out; two MLP matmuls
    attention = 2 * seq * seq * hidden  # QK^T and AV over all heads
    assert count_macs(path, {"input_ids": [8, seq], "attention_mask": [8, seq]}) == layers * (
        projections + attention
    )


def test_an_onnx_archive_loads_with_its_external_data(tmp_path: Path) -> None:
    import onnxruntime as ort

    from tests import factories_onnx

    src = factories_onnx.opset20_cnn(tmp_path / "src")
    packed = factories_onnx.archive_of(src, tmp_path / "blob", "zip", prefix="export/")
    wm = load_model(packed, "onnx", {}, tmp_path / "work")
    assert wm.onnx_path == tmp_path / "work" / "model.onnx" and wm.meta["opset"] == 20
    assert (tmp_path / "work" / "model.onnx.data").read_bytes() == (src.parent / "model.onnx.data").read_bytes()
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    got = ort.InferenceSession(str(wm.onnx_path)).run(None, {"input": x})[0]
    want = ort.InferenceSession(str(src)).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_an_onnx_archive_missing_its_data_fails_the_step(tmp_path: Path) -> None:
    from tests import factories_onnx

    src = factories_onnx.opset20_cnn(tmp_path / "src")
    packed = factories_onnx.pack({"model.onnx": src}, tmp_path / "blob", "tar")
    with pytest.raises(InvalidModel, match=r"ONNX archive rejected: .*'model\.onnx\.data' does not exist"):
        load_model(packed, "onnx", {}, tmp_path / "work")
