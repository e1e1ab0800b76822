"""Inspection of a zip/tar.gz Hugging Face model folder: config, safetensors parameter count, ONNX interface."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path, PurePosixPath
from typing import Any

from api.inspection.common import InspectionError, list_archive
from storage import archive
from storage.archive import ArchiveError, Entry

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".pt2", ".joblib")
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
# Hugging Face model types whose tokenizers return token_type_ids (segment ids).
BERT_LIKE = frozenset(
    {
        "bert",
        "albert",
        "electra",
        "mobilebert",
        "funnel",
        "squeezebert",
        "ernie",
        "megatron-bert",
        "nezha",
        "roformer",
        "convbert",
        "layoutlm",
        "xlnet",
    }
)
VISION_TYPES = frozenset(
    {
        "vit",
        "deit",
        "beit",
        "convnext",
        "convnextv2",
        "resnet",
        "swin",
        "swinv2",
        "mobilevit",
        "mobilevitv2",
        "efficientnet",
        "regnet",
        "dinov2",
        "mobilenet_v1",
        "mobilenet_v2",
        "levit",
        "poolformer",
        "cvt",
        "van",
        "bit",
        "dit",
        "focalnet",
        "efficientformer",
    }
)
CONFIG_KEYS = (
    "model_type",
    "architectures",
    "num_labels",
    "id2label",
    "label2id",
    "problem_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "image_size",
    "num_channels",
    "patch_size",
    "hidden_sizes",
    "depths",
    "dim",
    "n_layers",
    "n_heads",
    "n_embd",
    "n_layer",
    "n_head",
    "torch_dtype",
    "dtype",
)
SAFETENSORS_DTYPES = frozenset(
    {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32", "F64",
     "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"}
)


def _safetensors_params(path: Path, entry: Entry) -> int:
    """Parameter count from one safetensors member's header (8-byte little-endian length + JSON)."""
    with archive.open_member(path, entry) as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise InspectionError(f"{entry.name}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length < 2 or length > MAX_SAFETENSORS_HEADER or 8 + length > entry.size:
            raise InspectionError(f"{entry.name}: safetensors header length {length} is invalid")
        raw = fh.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InspectionError(f"{entry.name}: safetensors header is not JSON") from exc
    if not isinstance(header, dict):
        raise InspectionError(f"{entry.name}: safetensors header is not a JSON object")
    data_size = entry.size - 8 - length
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if (
            not isinstance(info, dict)
            or info.get("dtype") not in SAFETENSORS_DTYPES
            or not isinstance(info.get("shape"), list)
            or not all(isinstance(d, int) and d >= 0 for d in info["shape"])
        ):
            raise InspectionError(f"{entry.name}: tensor {name!r} has an invalid header entry")
        offsets = info.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise InspectionError(f"{entry.name}: tensor {name!r} has data offsets outside the file")
        total += math.prod(info["shape"])
    return total


def _image_size(config: dict[str, Any]) -> tuple[int, int]:
    size = config.get("image_size", 224)
    if isinstance(size, int):
        return size, size
    if isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    if isinstance(size, dict):
        h, w = size.get("height"), size.get("width")
        if isinstance(h, int) and isinstance(w, int):
            return h, w
    return 224, 224


def _num_labels(config: dict[str, Any]) -> int | None:
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    n = config.get("num_labels")
    return n if isinstance(n, int) else None


def hf_interface(config: dict[str, Any]) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """The task family and the inputs/outputs the exported ONNX of an hf ``config`` will have."""
    model_type = str(config.get("model_type", "")).lower()
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    vision = model_type in VISION_TYPES or ("num_channels" in config and "vocab_size" not in config)
    labels = _num_labels(config)
    classify = any(a.endswith(("ForSequenceClassification", "ForImageClassification")) for a in archs)
    if vision:
        h, w = _image_size(config)
        channels = config.get("num_channels", 3)
        inputs = [{"name": "pixel_values", "dtype": "float32",
                   "shape": ["batch", channels if isinstance(channels, int) else 3, h, w]}]
        task = "image-classification" if classify else "feature-extraction"
    elif "vocab_size" in config or model_type:
        names = ["input_ids", "attention_mask"]
        type_vocab = config.get("type_vocab_size")
        if model_type in BERT_LIKE or (isinstance(type_vocab, int) and type_vocab >= 2):
            names.append("token_type_ids")
        inputs = [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in names]
        task = "text-classification" if classify else "feature-extraction"
    else:
        inputs, task = [], "generic"
    outputs: list[dict[str, Any]] = []
    if classify:
        outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", labels]}]
    return task, inputs, outputs


def inspect_hf(path: Path) -> dict[str, Any]:
    """Config, parameter count and ONNX interface of a zip/tar.gz Hugging Face model folder."""
    entries = list_archive(path, archive.HF_LIMITS)
    kind = archive.detect_kind(path)
    files = [e for e in entries if not e.is_dir and not archive.is_junk(e.name)]
    pickled = [e.name for e in files if e.name.lower().endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise InspectionError(
            f"{pickled[0]!r} is a pickle-based weight file, which is never loaded; "
            "save the weights as safetensors (save_pretrained(..., safe_serialization=True))"
        )
    root = archive.common_root(entries)
    by_name = {e.name[len(root):]: e for e in files if e.name.startswith(root)}
    config_entry = by_name.get("config.json")
    if config_entry is None:
        raise InspectionError("the archive has no config.json at its top level (or in its single top folder)")
    weights = [e for rel, e in by_name.items() if rel.endswith(".safetensors")]
    if not weights:
        raise InspectionError("the archive has no *.safetensors weight file")
    try:
        config = json.loads(archive.read_member(path, config_entry, MAX_CONFIG_BYTES))
    except ArchiveError as exc:
        raise InspectionError(str(exc)) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InspectionError(f"config.json is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InspectionError("config.json is not a JSON object")
    try:
        params = sum(_safetensors_params(path, e) for e in weights)
    except ArchiveError as exc:
        raise InspectionError(str(exc)) from exc
    task, inputs, outputs = hf_interface(config)
    summary = {k: config[k] for k in CONFIG_KEYS if k in config}
    labels = _num_labels(config)
    if labels is not None:
        summary["num_labels"] = labels
    rels = sorted(by_name)
    meta: dict[str, Any] = {
        "inputs": inputs,
        "outputs": outputs,
        "input_names": [i["name"] for i in inputs],
        "parameters": int(params),
        "config": summary,
        "task": task,
        "archive": kind,
        "root": root,
        "files": rels[:500],
        "weights": sorted(rel for rel in rels if rel.endswith(".safetensors")),
        "has_tokenizer": any(
            PurePosixPath(r).name in ("tokenizer.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
                                      "vocab.json", "tokenizer.model")
            for r in rels
        ),
        "has_preprocessor": "preprocessor_config.json" in by_name,
    }
    if outputs:
        meta["output_names"] = [o["name"] for o in outputs]
    return meta
