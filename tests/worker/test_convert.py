"""worker.convert: ONNX -> torch (onnx2torch without torchvision), torch -> ONNX with parity."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest

from tests import factories_train as f
from worker import convert
from worker.core import StepFailed
from worker.metrics import torch_metric


def test_onnx2torch_imports_without_leaving_a_fake_torchvision() -> None:
    import importlib.util

    convert.import_onnx2torch()
    if "torchvision" in sys.modules:  # a real torchvision is installed: nothing to check
        return
    assert importlib.util.find_spec("torchvision") is None  # transformers must still see it as absent
    from onnx2torch.node_converters import nms, roialign

    assert nms.torchvision.__modelpress_stub__
    with pytest.raises(NotImplementedError, match="torchvision"):
        nms.torchvision.ops.nms(None, None, 0.5)
    with pytest.raises(NotImplementedError, match="torchvision"):
        roialign.roi_align(None, None, 1)


def test_onnx_to_torch_keeps_interface_and_accuracy(tmp_path: Path) -> None:
    path, acc = f.cnn_onnx()
    _, evald = f.digits()
    ctx = f.MemoryContext(tmp_path, f.spec(), data={"eval": evald})
    model = convert.to_torch(f.onnx_model(path), ctx)
    assert model.form == "torch" and model.origin == "onnx"
    assert model.input_names == ["input"] and model.output_names == ["logits"]
    assert model.meta["dynamic_axes"]["input"] == {0: "batch"}
    metrics = torch_metric(model, evald, ctx.spec)
    assert metrics["accuracy"] == pytest.approx(acc, abs=0.002)


def test_round_trip_to_onnx_keeps_dynamic_batch(tmp_path: Path) -> None:
    path, _ = f.cnn_onnx()
    _, evald = f.digits()
    ctx = f.MemoryContext(tmp_path, f.spec(), data={"eval": evald})
    back = convert.to_onnx(convert.to_torch(f.onnx_model(path), ctx), ctx, 17, name="rt")
    assert back.form == "onnx" and back.onnx_path is not None and back.onnx_path.parent == tmp_path
    graph = onnx.load(str(back.onnx_path)).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert back.meta["parity"]["max_abs_diff"] < 1e-3
    assert back.meta["parity"]["top1_agreement"] == 1.0




def test_missing_data_fails_clearly(tmp_path: Path) -> None:
    path, _ = f.cnn_onnx()
    ctx = f.MemoryContext(tmp_path, f.spec())
    model = convert.to_torch(f.onnx_model(path), ctx)
    with pytest.raises(StepFailed) as err:
        convert.to_onnx(model, ctx, 17, name="x")
    assert err.value.code == "no_data"
