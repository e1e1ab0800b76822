"""The API's table of convertible operators matches the worker's onnx2torch registry (with our converters)."""

from __future__ import annotations

import onnx

from models.convertible import CONVERTIBLE, MAX_OPSET, newest_convertible_opset, unconvertible


def test_the_table_is_what_the_worker_registry_converts() -> None:
    from worker.convert import import_onnx2torch

    import_onnx2torch()  # onnx2torch needs the stand-in torchvision before worker.onnx2torch_ops imports it
    from worker.onnx2torch_ops import convertible_ranges

    assert onnx.defs.onnx_opset_version() == MAX_OPSET
    assert convertible_ranges(MAX_OPSET) == CONVERTIBLE


def test_todays_cnn_export_converts_and_unknown_ops_are_named() -> None:
    cnn = ["Conv", "Relu", "MaxPool", "AveragePool", "ReduceMean", "Reshape", "Gemm"]
    assert unconvertible(cnn, 20) == []
    assert unconvertible([*cnn, "GridSample", "DeformConv"], 20) == ["DeformConv", "GridSample"]
    assert unconvertible(["Gelu"], 18) == ["Gelu"]  # Gelu is an ONNX op from opset 20 on
    assert newest_convertible_opset(["Gelu"], 20) is None
    assert newest_convertible_opset(["Conv"], 20) == 19
