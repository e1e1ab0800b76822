"""Hugging Face archive inspection: config summary, safetensors parameter count, the exported interface."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from api.inspection import InspectionError, hf_interface, inspect_hf
from tests.api import builders


def _zip(tmp_path: Path, files: dict[str, bytes]) -> Path:
    path = tmp_path / "up-staged"
    path.write_bytes(builders.zip_bytes(files))
    return path


def test_a_bert_classifier_in_a_top_folder(tmp_path: Path) -> None:
    meta = inspect_hf(_zip(tmp_path, builders.hf_files(root="bert/")))
    assert meta["root"] == "bert/" and meta["archive"] == "zip" and meta["task"] == "text-classification"
    assert meta["input_names"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert meta["output_names"] == ["logits"] and meta["outputs"][0]["shape"] == ["batch", 2]
    assert meta["parameters"] == 30 * 8 + 2 * 8 and meta["weights"] == ["model.safetensors"]
    assert meta["files"] == ["config.json", "model.safetensors", "vocab.txt"]
    assert meta["has_tokenizer"] and not meta["has_preprocessor"]
    assert meta["config"]["num_labels"] == 2 and meta["config"]["model_type"] == "bert"


@pytest.mark.parametrize(
    ("config", "task", "inputs"),
    [
        ({"model_type": "vit", "image_size": [48, 64], "num_channels": 1}, "feature-extraction",
         [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 1, 48, 64]}]),
        ({"model_type": "convnext", "image_size": {"height": 20, "width": 30},
          "architectures": ["ConvNextForImageClassification"], "num_labels": 5}, "image-classification",
         [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 20, 30]}]),
        ({"model_type": "gpt2", "vocab_size": 50}, "feature-extraction",
         [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in ("input_ids", "attention_mask")]),
        ({}, "generic", []),
    ],
)
def test_interface_from_config(config: dict, task: str, inputs: list) -> None:
    got_task, got_inputs, outputs = hf_interface(config)
    assert (got_task, got_inputs) == (task, inputs)
    assert outputs == ([{"name": "logits", "dtype": "float32", "shape": ["batch", 5]}] if "architectures" in config else [])


def _safetensors_with_header(header: dict, data: int = 8) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(data)


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        ({**builders.hf_files(), "model.ckpt": b"x"}, "pickle-based"),
        ({"weights.safetensors": builders.safetensors_bytes({"w": ("F32", [1])})}, "no config.json"),
        ({"config.json": b"{}"}, r"no \*\.safetensors weight file"),
        ({"config.json": b"{not json", "m.safetensors": builders.safetensors_bytes({})}, "not valid JSON"),
        ({"config.json": b"{}", "m.safetensors": b"1234"}, "too short"),
        ({"config.json": b"{}", "m.safetensors": _safetensors_with_header({"w": {"dtype": "F99", "shape": [2]}})},
         "invalid header entry"),
        ({"config.json": b"{}",
          "m.safetensors": _safetensors_with_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 99]}})},
         "data offsets outside"),
    ],
)
def test_refusals(tmp_path: Path, files: dict[str, bytes], needle: str) -> None:
    with pytest.raises(InspectionError, match=needle):
        inspect_hf(_zip(tmp_path, files))


def test_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "up-staged"
    path.write_bytes(b"plain bytes" * 10)
    with pytest.raises(InspectionError, match="unsafe or unreadable archive"):
        inspect_hf(path)
