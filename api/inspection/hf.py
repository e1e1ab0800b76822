"""Inspection of a zip/tar.gz Hugging Face model folder: config, safetensors parameter count, ONNX interface.

Causal LMs (an architecture ``AutoModelForCausalLM`` builds, by transformers' own table) get task
``text-generation`` and their layers, vocabulary, context length, dtype, tokenizer and chat template in
``meta``; sharded weights come with ``model.safetensors.index.json``, whose every shard must be present.
Configs with ``auto_map`` (custom model code) are refused: nothing uploaded is ever run as code.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path, PurePosixPath
from typing import Any

from api.inspection.common import InspectionError, list_archive
from api.inspection.tokenizer import inspect_tokenizer
from api.inspection.transformers_names import stock_tables
from api.inspection.wrong_format import wrong_format_hint
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
    "n_positions",
    "n_ctx",
    "num_key_value_heads",
    "tie_word_embeddings",
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


SAFETENSORS_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                            "I8": "int8", "U8": "uint8", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _safetensors_header(path: Path, entry: Entry) -> dict[str, tuple[str, int]]:
    """``{tensor: (dtype, elements)}`` from one safetensors member's header (8-byte little-endian length + JSON)."""
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
    tensors: dict[str, tuple[str, int]] = {}
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
        tensors[name] = (str(info["dtype"]), math.prod(info["shape"]))
    return tensors


def _weight_files(path: Path, by_name: dict[str, Entry]) -> list[str]:
    """The safetensors files that hold the weights: the shards ``model.safetensors.index.json`` names (every one
    present, every tensor it maps in its shard), else every top-level ``*.safetensors``."""
    index_entry = by_name.get("model.safetensors.index.json")
    if index_entry is None:
        return sorted(rel for rel in by_name if rel.endswith(".safetensors"))
    try:
        index = json.loads(archive.read_member(path, index_entry, MAX_CONFIG_BYTES))
    except ArchiveError as exc:
        raise InspectionError(str(exc)) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InspectionError(f"model.safetensors.index.json is not valid JSON: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InspectionError("model.safetensors.index.json has no 'weight_map' of tensor names to shard files")
    by_shard: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or not shard.endswith(".safetensors"):
            raise InspectionError(f"model.safetensors.index.json maps {tensor!r} to {shard!r}, not a "
                                  "*.safetensors file next to the index")
        by_shard.setdefault(shard, set()).add(str(tensor))
    missing = sorted(s for s in by_shard if s not in by_name)
    if missing:
        raise InspectionError(f"model.safetensors.index.json names shard {missing[0]!r}, which is not in the "
                              f"archive ({len(missing)} of {len(by_shard)} shards missing)")
    for shard, tensors in sorted(by_shard.items()):
        absent = sorted(tensors - set(_safetensors_header(path, by_name[shard])))
        if absent:
            raise InspectionError(f"model.safetensors.index.json puts tensor {absent[0]!r} in {shard!r}, "
                                  "which does not hold it")
    return sorted(by_shard)


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


# Class-name endings of causal LMs, for when transformers' own table cannot be read (an API without it).
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# Config keys that hold a model's depth and its context length, in the order transformers' configs use them.
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def _architectures(config: dict[str, Any]) -> list[str]:
    return [a for a in config.get("architectures") or [] if isinstance(a, str)]


def causal_architecture(config: dict[str, Any]) -> str | None:
    """The config's architecture that claims to be a causal LM (in transformers' causal-LM table, or named
    like one), or None."""
    tables = stock_tables()
    known = tables.causal_classes if tables is not None else frozenset()
    for arch in _architectures(config):
        if arch in known or arch.endswith(CAUSAL_SUFFIXES):
            return arch
    return None


def check_causal_lm(config: dict[str, Any], arch: str) -> None:
    """InspectionError unless stock transformers builds ``arch`` with AutoModelForCausalLM from ``config``."""
    tables = stock_tables()
    if tables is None:
        return  # no table to judge by here; the worker's AutoModelForCausalLM does
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise InspectionError(f"config.json names architecture {arch!r} but no 'model_type'")
    where = f"transformers {tables.version}"
    if model_type not in tables.model_types and model_type not in tables.causal_lm:
        raise InspectionError(f"config.json has model_type {model_type!r}, which {where} does not ship "
                              "(custom model code is never run)")
    if arch not in tables.causal_classes:
        raise InspectionError(f"config.json names architecture {arch!r}, which is not a causal LM {where} "
                              "builds (AutoModelForCausalLM); custom model code is never run")
    if model_type not in tables.causal_lm:
        raise InspectionError(f"config.json has model_type {model_type!r}, for which {where} has no causal LM "
                              f"class, but names architecture {arch!r}")


def _first_int(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def context_length(config: dict[str, Any]) -> int | None:
    """The positions a text model has (max_position_embeddings, GPT-2's n_positions, ...), or None."""
    return _first_int(config, CONTEXT_KEYS)


def hf_interface(config: dict[str, Any]) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """The task family and the inputs/outputs the exported ONNX of an hf ``config`` will have."""
    model_type = str(config.get("model_type", "")).lower()
    archs = _architectures(config)
    if causal_architecture(config) is not None:
        vocab: Any = config.get("vocab_size") if isinstance(config.get("vocab_size"), int) else "vocab"
        lm_inputs: list[dict[str, Any]] = [
            {"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in ("input_ids", "attention_mask")
        ]
        return "text-generation", lm_inputs, [
            {"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", vocab]}
        ]
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
    hint = wrong_format_hint(path, "hf")  # a torch.save pickle, an ONNX archive: say what to do
    if hint:
        raise InspectionError(hint)
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
    if "auto_map" in config:
        raise InspectionError("config.json has 'auto_map' (custom model code), which is never run "
                              "(no trust_remote_code); remove it when the model_type is one transformers ships")
    arch = causal_architecture(config)
    if arch is not None:
        check_causal_lm(config, arch)
    try:
        weight_files = _weight_files(path, by_name)
        headers = {rel: _safetensors_header(path, by_name[rel]) for rel in weight_files}
    except ArchiveError as exc:
        raise InspectionError(str(exc)) from exc
    params = sum(n for tensors in headers.values() for _, n in tensors.values())
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
    tokenizer = inspect_tokenizer(path, by_name)
    meta["tokenizer"] = tokenizer
    if task == "text-generation":
        meta.update(_lm_summary(config, arch, headers, tokenizer))
    return meta


def _lm_summary(config: dict[str, Any], arch: str | None, headers: dict[str, dict[str, tuple[str, int]]],
                tokenizer: dict[str, Any] | None) -> dict[str, Any]:
    """What an LM upload reports: architecture, layers, vocabulary, context length, dtype, chat template."""
    by_dtype: dict[str, int] = {}
    for tensors in headers.values():
        for dtype, n in tensors.values():
            by_dtype[dtype] = by_dtype.get(dtype, 0) + n
    stored = max(by_dtype, key=lambda d: by_dtype[d]) if by_dtype else None
    declared = config.get("torch_dtype") or config.get("dtype")
    return {
        "architecture": arch,
        "layers": _first_int(config, LAYER_KEYS),
        "vocab_size": _first_int(config, ("vocab_size",)),
        "context_length": context_length(config),
        "dtype": SAFETENSORS_TORCH_DTYPES.get(stored or "", stored) if stored else declared,
        "chat_template": bool(tokenizer and tokenizer["chat_template"]),
        "shards": len(headers),
    }
