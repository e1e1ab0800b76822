"""Hugging Face archive inspection: config summary, safetensors parameter count, the exported interface; causal
LMs (sharded or not) with their layers, vocabulary, context, dtype, tokenizer fingerprint and chat template."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.inspection import InspectionError, hf_interface, inspect_hf
from models.db import session_scope
from models.tables import Model
from tests.api import builders
from tests.api.conftest import blobs, temp_files
from tests.factories_lm import tiny_lm_dir
from tests.factories_train import zip_dir


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


# --- causal LMs -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A sharded tiny Llama (9 shards + index) and a single-file tiny GPT-2, with the same trained tokenizer."""
    tmp = tmp_path_factory.mktemp("lm")
    return {"llama": tiny_lm_dir(tmp / "llama", max_shard_size="100KB"),
            "gpt2": tiny_lm_dir(tmp / "gpt2", kind="gpt2")}


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _edit_config(folder: Path, **changes: object) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _model_rows() -> int:
    with session_scope() as s:
        return int(s.scalar(select(func.count()).select_from(Model)) or 0)


def test_a_sharded_llama_is_a_text_generation_model_with_its_lm_summary(
    tmp_path: Path, lm_dirs: dict[str, Path]
) -> None:
    from transformers import LlamaForCausalLM

    meta = inspect_hf(zip_dir(lm_dirs["llama"], tmp_path / "l.zip", prefix="llama/"))
    module = LlamaForCausalLM.from_pretrained(lm_dirs["llama"])
    assert meta["task"] == "text-generation" and meta["architecture"] == "LlamaForCausalLM"
    assert meta["parameters"] == sum(p.numel() for p in module.parameters()) == 197_184
    assert meta["shards"] == 9 and len(meta["weights"]) == 9
    assert (meta["layers"], meta["vocab_size"], meta["context_length"], meta["dtype"]) == (4, 384, 256, "float32")
    assert meta["chat_template"] is True
    assert meta["input_names"] == ["input_ids", "attention_mask"] and meta["output_names"] == ["logits"]
    assert meta["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", 384]}]
    assert meta["tokenizer"]["file"] == "tokenizer.json" and meta["tokenizer"]["vocab_size"] == 384
    assert meta["config"]["num_key_value_heads"] == 2


def test_gpt2_counts_tied_weights_once_and_takes_its_context_from_n_positions(
    tmp_path: Path, lm_dirs: dict[str, Path]
) -> None:
    from transformers import GPT2LMHeadModel

    meta = inspect_hf(zip_dir(lm_dirs["gpt2"], tmp_path / "g.zip"))
    module = GPT2LMHeadModel.from_pretrained(lm_dirs["gpt2"])
    assert meta["task"] == "text-generation" and meta["architecture"] == "GPT2LMHeadModel"
    assert meta["parameters"] == module.num_parameters() and meta["shards"] == 1
    assert (meta["layers"], meta["context_length"]) == (4, 256) and meta["config"]["n_positions"] == 256


def test_the_tokenizer_fingerprint_is_the_vocabulary_not_the_file(tmp_path: Path, lm_dirs: dict[str, Path]) -> None:
    llama = inspect_hf(zip_dir(lm_dirs["llama"], tmp_path / "l.zip"))["tokenizer"]
    gpt2 = inspect_hf(zip_dir(lm_dirs["gpt2"], tmp_path / "g.zip"))["tokenizer"]
    assert llama["sha256"] == gpt2["sha256"] and len(llama["sha256"]) == 64
    reformatted = _copy(lm_dirs["gpt2"], tmp_path / "reformatted")
    doc = json.loads((reformatted / "tokenizer.json").read_text())
    (reformatted / "tokenizer.json").write_text(json.dumps(doc, indent=4, sort_keys=True))
    assert inspect_hf(zip_dir(reformatted, tmp_path / "r.zip"))["tokenizer"]["sha256"] == gpt2["sha256"]
    other = _copy(lm_dirs["gpt2"], tmp_path / "other")
    doc["model"]["vocab"] = {tok: (i + 1) % 384 for tok, i in doc["model"]["vocab"].items()}
    (other / "tokenizer.json").write_text(json.dumps(doc))
    assert inspect_hf(zip_dir(other, tmp_path / "o.zip"))["tokenizer"]["sha256"] != gpt2["sha256"]


def test_a_bert_vocab_txt_is_a_tokenizer_of_that_many_tokens(tmp_path: Path) -> None:
    meta = inspect_hf(_zip(tmp_path, builders.hf_files()))
    assert meta["tokenizer"]["file"] == "vocab.txt" and meta["tokenizer"]["vocab_size"] == 3
    assert meta["tokenizer"]["chat_template"] is False and "layers" not in meta


def test_an_lm_upload_answers_its_summary(client: TestClient, tmp_path: Path, lm_dirs: dict[str, Path]) -> None:
    data = zip_dir(lm_dirs["llama"], tmp_path / "l.zip", prefix="llama/").read_bytes()
    r = client.put("/v1/models", params={"name": "llama", "format": "hf"}, content=data)
    assert r.status_code == 201, r.text
    body = r.json()
    assert [i["name"] for i in body["inputs"]] == ["input_ids", "attention_mask"]
    assert body["meta"]["task"] == "text-generation" and body["meta"]["context_length"] == 256
    assert body["meta"]["tokenizer"]["vocab_size"] == 384


def _drop_shard(folder: Path) -> Path:
    (folder / "model-00003-of-00009.safetensors").unlink()
    return folder


def _misplace_tensor(folder: Path) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][name] = next(s for s in shards if s != index["weight_map"][name])
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _no_tokenizer(folder: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink()
    return folder


@pytest.mark.parametrize(
    ("edit", "detail"),
    [
        (lambda d: _edit_config(d, architectures=["FancyForCausalLM"]),
         "config.json names architecture 'FancyForCausalLM', which is not a causal LM transformers "),
        (lambda d: _edit_config(d, model_type="fancy", architectures=["FancyForCausalLM"]),
         "config.json has model_type 'fancy', which transformers "),
        (lambda d: _edit_config(d, auto_map={"AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"}),
         "config.json has 'auto_map' (custom model code), which is never run"),
        (_drop_shard, "model.safetensors.index.json names shard 'model-00003-of-00009.safetensors', which is not "
                      "in the archive (1 of 9 shards missing)"),
        (_misplace_tensor, "model.safetensors.index.json puts tensor "),
    ],
)
def test_an_lm_transformers_cannot_build_is_a_422_naming_it_and_leaves_nothing(
    client: TestClient, storage_dir: Path, tmp_path: Path, lm_dirs: dict[str, Path], edit: Any, detail: str
) -> None:
    folder = edit(_copy(lm_dirs["llama"], tmp_path / "bad"))
    r = client.put("/v1/models", params={"format": "hf"}, content=zip_dir(folder, tmp_path / "b.zip").read_bytes())
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "invalid_model" and r.json()["detail"].startswith(f"not a valid hf model: {detail}")
    assert _model_rows() == 0 and blobs(storage_dir) == [] and temp_files(storage_dir) == []


def test_an_lm_without_a_tokenizer_is_stored_and_says_so(tmp_path: Path, lm_dirs: dict[str, Path]) -> None:
    meta = inspect_hf(zip_dir(_no_tokenizer(_copy(lm_dirs["gpt2"], tmp_path / "bare")), tmp_path / "b.zip"))
    assert meta["task"] == "text-generation" and meta["tokenizer"] is None and meta["has_tokenizer"] is False
    assert meta["chat_template"] is False
