"""The model-format table: each row's inspector and loader exist, and the client infers formats from it."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from api.inspection import MODEL_INSPECTORS
from client.sdk import infer_model_format
from models.formats import MODEL_FORMATS, model_format, resolve
from worker.core import WorkingModel


def test_every_row_names_an_inspector_and_a_loader_that_exist() -> None:
    assert set(MODEL_INSPECTORS) == set(MODEL_FORMATS) == {"onnx", "hf"}
    for fmt in MODEL_FORMATS.values():
        assert MODEL_INSPECTORS[fmt.name] is resolve(fmt.inspector)
        assert resolve(fmt.loader).__module__ == fmt.loader.split(":")[0]
    with pytest.raises(ValueError, match=r"unknown model format 'pt' \(known: onnx, hf\)"):
        model_format("pt")


def test_the_rows_say_what_differs() -> None:
    onnx, hf = MODEL_FORMATS["onnx"], MODEL_FORMATS["hf"]
    assert (onnx.form, onnx.transformers, onnx.stage_cached) == ("onnx", False, True)
    assert (hf.form, hf.transformers, hf.stage_cached) == ("torch", True, False)
    assert WorkingModel("torch", "hf", [], []).transformers and not WorkingModel("onnx", "onnx", [], []).transformers


def _zip(path: Path, *names: str) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            zf.writestr(name, b"x")
    return path


def test_the_client_infers_the_format_from_the_rows_in_order(tmp_path: Path) -> None:
    assert infer_model_format(tmp_path / "m.onnx") == "onnx"
    assert infer_model_format(_zip(tmp_path / "external.zip", "m/model.onnx", "m/model.onnx.data")) == "onnx"
    assert infer_model_format(_zip(tmp_path / "bert.zip", "bert/config.json", "bert/model.safetensors")) == "hf"
    assert infer_model_format(_zip(tmp_path / "both.zip", "config.json", "model.onnx")) == "hf"
    with pytest.raises(ValueError, match=r"pass format= \(onnx or hf\)"):
        infer_model_format(tmp_path / "model.tflite")
    with pytest.raises(ValueError, match=r"PyTorch pickles \(torch.save\) are refused"):
        infer_model_format(tmp_path / "model.pt")
