"""Inspect uploaded files without torch: what a model takes and gives, what a dataset holds.

Each ``inspect_*`` function reads a stored file and returns the ``meta`` dict recorded on its row, or
raises InspectionError with a message for the user. ``onnx`` and ``numpy`` are imported lazily.

Model meta: ``inputs``/``outputs`` (``[{name, dtype, shape}]``, dynamic dims as their dim_param or None),
``parameters``; onnx adds ``opset``, ``opsets``, ``ir_version``, ``producer``; hf adds ``archive``,
``root`` (prefix inside the archive), ``config`` (selected config.json keys), ``files``, ``task``,
``input_names`` (and ``output_names`` for classifiers).
Dataset meta: ``num_samples``, ``fields`` (``{name: {dtype, shape?}}``), ``classes`` (sorted, as
strings, or None); imagefolder adds ``root`` and ``class_counts``; text adds ``text_format``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from worker.formats import archive
from worker.formats.archive import ArchiveError, Entry, Limits

if TYPE_CHECKING:
    import onnx

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".pt2", ".joblib")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The same caps the worker applies when it extracts (worker/formats/hf.py, imagefolder.py), so an upload
# that passes here also extracts there.
HF_LIMITS = Limits(max_total_bytes=16 * 1024**3, max_entries=10_000, max_ratio=200.0)
IMAGEFOLDER_LIMITS = Limits(max_total_bytes=8 * 1024**3, max_entries=500_000, max_ratio=200.0)
# An npz is a zip the worker inflates whole into memory (np.load): the same ratio cap as any archive.
NPZ_LIMITS = Limits(max_entries=10_000, max_ratio=200.0)
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
MAX_CLASSES = 100_000
MAX_LABEL_BYTES = 1024**3
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


class InspectionError(ValueError):
    """The upload is not a valid file of its declared format; the message tells the user why."""


# --------------------------------------------------------------------------------------------- models


def _dim_list(type_proto: Any) -> list[int | str | None]:
    shape: list[int | str | None] = []
    tensor = type_proto.tensor_type
    if not tensor.HasField("shape"):
        return shape
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        elif dim.HasField("dim_param") and dim.dim_param:
            shape.append(str(dim.dim_param))
        else:
            shape.append(None)
    return shape


def _dtype_name(elem_type: int) -> str:
    import onnx

    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type).name)
    except (KeyError, ValueError, TypeError):
        return str(onnx.TensorProto.DataType.Name(elem_type)).lower()


def _value_info(value: Any) -> dict[str, Any]:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return {"name": value.name, "dtype": str(kind or "unknown"), "shape": []}
    return {"name": value.name, "dtype": _dtype_name(value.type.tensor_type.elem_type), "shape": _dim_list(value.type)}


def inspect_onnx(path: Path) -> dict[str, Any]:
    """Inputs, outputs, opset, IR version, producer and parameter count of a single-file ONNX model."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, TypeError, UnicodeDecodeError) as exc:
        raise InspectionError(f"the file is not an ONNX model (protobuf parse failed: {exc})") from exc
    except Exception as exc:
        raise InspectionError(f"the file is not an ONNX model ({type(exc).__name__})") from exc
    if not model.HasField("graph") or not model.opset_import:
        raise InspectionError("the file is not an ONNX model (no graph or no opset import)")
    from worker.formats.onnx_model import all_tensors  # onnx + numpy only, no torch

    external = [t.name for t in all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise InspectionError(
            f"tensor {external[0]!r} references external data, which a single-file upload cannot carry; "
            "save the model with all tensors inside the file (onnx.save(..., save_as_external_data=False)) "
            "or upload it as an archive"
        )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InspectionError(f"the ONNX model is invalid: {first}") from exc
    return _onnx_meta(model)


def _onnx_meta(model: onnx.ModelProto) -> dict[str, Any]:
    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    params = sum(math.prod(t.dims) for t in graph.initializer)
    params += sum(math.prod(s.dims) for s in graph.sparse_initializer)
    opsets = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    return {
        "inputs": [_value_info(v) for v in graph.input if v.name not in init_names],
        "outputs": [_value_info(v) for v in graph.output],
        "opset": opsets.get("ai.onnx"),
        "opsets": opsets,
        "ir_version": int(model.ir_version),
        "parameters": int(params),
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p) or None,
        "graph_name": graph.name or None,
        "nodes": len(graph.node),
    }


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
    try:
        entries = archive.list_entries(path, HF_LIMITS)
    except ArchiveError as exc:
        raise InspectionError(f"unsafe or unreadable archive: {exc}") from exc
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


# ------------------------------------------------------------------------------------------- datasets


def _sorted_labels(values: Iterable[Any]) -> list[str]:
    """Unique labels sorted numerically when they are all numbers, else as text; returned as strings."""
    unique = set(values)
    if len(unique) > MAX_CLASSES:
        raise InspectionError(f"more than {MAX_CLASSES} distinct labels; labels must be class ids or names")
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in unique):
        return [_label_text(v) for v in sorted(unique)]
    return sorted(_label_text(v) for v in unique)


def _label_text(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def inspect_npz(path: Path) -> dict[str, Any]:
    """Sample count, arrays (dtype and shape) and classes of a ``.npz`` file, without pickle."""
    import zipfile

    import numpy as np

    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InspectionError(f"the file is not a readable .npz archive: {exc}") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise InspectionError("the file is a single .npy array, not an .npz archive of named arrays")
    with npz:
        try:
            archive.list_entries(path, NPZ_LIMITS)
        except ArchiveError as exc:
            raise InspectionError(f"unsafe or unreadable archive: {exc}") from exc
        fields: dict[str, Any] = {}
        dtypes: dict[str, Any] = {}
        zf = npz.zip
        if zf is None:
            raise InspectionError("the .npz archive could not be opened")
        if len(zf.infolist()) > 10_000:
            raise InspectionError("the .npz archive holds more than 10000 arrays")
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                raise InspectionError(f"member {info.filename!r} is not a .npy array")
            name = info.filename[: -len(".npy")]
            try:
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                    else:
                        shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            except (ValueError, OSError, zipfile.BadZipFile) as exc:
                raise InspectionError(f"array {name!r}: unreadable header ({exc})") from exc
            if dtype.hasobject:
                raise InspectionError(f"array {name!r} holds Python objects (pickle), which are not loaded")
            if len(shape) == 0:
                raise InspectionError(f"array {name!r} is a scalar; every array needs a first (sample) axis")
            fields[name] = {"dtype": dtype.name if dtype.names is None else str(dtype), "shape": list(shape)}
            dtypes[name] = dtype
        if not fields:
            raise InspectionError("the .npz archive holds no arrays")
        counts = {name: f["shape"][0] for name, f in fields.items()}
        if len(set(counts.values())) != 1:
            desc = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise InspectionError(f"arrays disagree on the number of samples (first axis): {desc}")
        classes = None
        if "labels" in fields:
            info = fields["labels"]
            if len(info["shape"]) != 1:
                raise InspectionError(f"'labels' must be one-dimensional, got shape {info['shape']}")
            if info["shape"][0] * dtypes["labels"].itemsize > MAX_LABEL_BYTES:
                raise InspectionError("'labels' is too large")
            try:
                labels = npz["labels"]
            except ValueError as exc:
                raise InspectionError(f"'labels' could not be read: {exc}") from exc
            if labels.dtype.kind not in "iubU":
                raise InspectionError(f"'labels' must hold integers or strings, got {labels.dtype.name}")
            classes = _sorted_labels(np.unique(labels).tolist())
    return {"num_samples": int(next(iter(counts.values()))), "fields": fields, "classes": classes}


def inspect_imagefolder(path: Path) -> dict[str, Any]:
    """Sample count and classes of a zip/tar of ``<class>/<image>.png|jpg|jpeg`` (no image decoding)."""
    try:
        entries = archive.list_entries(path, IMAGEFOLDER_LIMITS)
    except ArchiveError as exc:
        raise InspectionError(f"unsafe or unreadable archive: {exc}") from exc
    root = archive.common_root(entries)
    counts: dict[str, int] = {}
    for entry in entries:
        if entry.is_dir or archive.is_junk(entry.name):
            continue
        rel = entry.name[len(root):] if root and entry.name.startswith(root) else entry.name
        parts = PurePosixPath(rel).parts
        is_image = rel.lower().endswith(IMAGE_SUFFIXES)
        if len(parts) == 2 and is_image:
            counts[parts[0]] = counts.get(parts[0], 0) + 1
        elif is_image or len(parts) > 1:
            raise InspectionError(
                f"member {entry.name!r} does not fit the layout <class>/<image>.png|jpg|jpeg"
            )
        # Loose files at the top level (README, LICENSE) are ignored.
    if not counts:
        raise InspectionError("the archive holds no images laid out as <class>/<image>.png|jpg|jpeg")
    classes = sorted(counts)
    return {
        "num_samples": sum(counts.values()),
        "fields": {"image": {"dtype": "image"}, "label": {"dtype": "str"}},
        "classes": classes,
        "class_counts": {c: counts[c] for c in classes},
        "root": root,
        "archive": archive.detect_kind(path),
    }


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        while chunk := fh.read(4096):
            stripped = chunk.lstrip()
            if stripped.startswith(b"\xef\xbb\xbf"):
                stripped = stripped[3:].lstrip()
            if stripped:
                return stripped[:1]
    return b""


def _text_rows_jsonl(fh: io.TextIOBase) -> Iterable[tuple[int, dict[str, Any]]]:
    for lineno, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InspectionError(f"line {lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise InspectionError(f"line {lineno}: expected a JSON object")
        yield lineno, row


def _text_rows_csv(fh: io.TextIOBase) -> Iterable[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(fh)
    if reader.fieldnames is None:
        raise InspectionError("the CSV file has no header row")
    for row in reader:
        if None in row:
            raise InspectionError(f"line {reader.line_num}: more values than header columns")
        yield reader.line_num, dict(row)


def inspect_text(path: Path) -> dict[str, Any]:
    """Sample count, columns and classes of a JSONL or CSV file with ``text`` and (optional) ``label``."""
    is_jsonl = _first_byte(path) == b"{"
    csv.field_size_limit(64 * 1024 * 1024)
    count = 0
    labels: set[Any] = set()
    labelled: bool | None = None
    label_type: str | None = None
    with open(path, encoding="utf-8-sig", newline="" if not is_jsonl else None) as fh:
        try:
            rows = _text_rows_jsonl(fh) if is_jsonl else _text_rows_csv(fh)
            for lineno, row in rows:
                text = row.get("text")
                if not isinstance(text, str):
                    raise InspectionError(f"line {lineno}: needs a 'text' value (a string)")
                has_label = row.get("label") not in (None, "")
                if labelled is None:
                    labelled = has_label
                elif labelled != has_label:
                    raise InspectionError(f"line {lineno}: 'label' must be given on every row or on none")
                if has_label:
                    label = row["label"]
                    if isinstance(label, bool) or not isinstance(label, int | str):
                        raise InspectionError(f"line {lineno}: 'label' must be an integer or a string")
                    if isinstance(label, str) and not is_jsonl and label.strip().lstrip("-").isdigit():
                        label = int(label)
                    labels.add(label)
                    if len(labels) > MAX_CLASSES:
                        raise InspectionError(f"more than {MAX_CLASSES} distinct labels")
                    label_type = "int64" if isinstance(label, int) and label_type != "str" else "str"
                count += 1
        except UnicodeDecodeError as exc:
            raise InspectionError(f"the file is not UTF-8 text ({exc.reason})") from exc
        except csv.Error as exc:
            raise InspectionError(f"the CSV file is malformed: {exc}") from exc
    if count == 0:
        raise InspectionError("the file holds no rows")
    fields: dict[str, Any] = {"text": {"dtype": "str"}}
    if labelled:
        fields["label"] = {"dtype": label_type or "str"}
    return {
        "num_samples": count,
        "fields": fields,
        "classes": _sorted_labels(labels) if labelled else None,
        "text_format": "jsonl" if is_jsonl else "csv",
    }


MODEL_INSPECTORS = {"onnx": inspect_onnx, "hf": inspect_hf}
DATASET_INSPECTORS = {"npz": inspect_npz, "imagefolder": inspect_imagefolder, "text": inspect_text}
