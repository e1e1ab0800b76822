"""Inspect uploaded files without torch (one module per format): what a model takes and gives, what a dataset holds.

Each ``inspect_*`` function reads a staged upload (a local file) and returns the ``meta`` dict recorded on its row, or
raises InspectionError with a message for the user. ``onnx`` and ``numpy`` are imported lazily.

Model meta: ``inputs``/``outputs`` (``[{name, dtype, shape}]``, dynamic dims as their dim_param or None),
``parameters``; onnx adds ``opset``, ``opsets``, ``ir_version``, ``producer``; hf adds ``archive``,
``root`` (prefix inside the archive), ``config`` (selected config.json keys), ``files``, ``task``,
``input_names`` (and ``output_names`` for classifiers and LMs), ``tokenizer`` (``{file, vocab_size, sha256,
chat_template}`` or None); causal LMs (task ``text-generation``) add ``architecture``, ``layers``,
``vocab_size``, ``context_length``, ``dtype``, ``chat_template``, ``shards``.
Dataset meta: ``num_samples``, ``fields`` (``{name: {dtype, shape?}}``), ``classes`` (sorted, as
strings, or None); imagefolder adds ``root`` and ``class_counts``; text adds ``text_format`` and
``row_shape`` (``text``, ``choice``, ``prompt_completion``, ``messages``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from api.inspection.common import InspectionError
from api.inspection.hf import hf_interface, inspect_hf
from api.inspection.imagefolder import inspect_imagefolder
from api.inspection.npz import inspect_npz
from api.inspection.onnx_model import inspect_onnx
from api.inspection.text import inspect_text
from models.formats import MODEL_FORMATS, resolve

Inspector = Callable[[Path], dict[str, Any]]
# The formats an upload accepts: one row each in models.formats.MODEL_FORMATS, which names its inspector.
MODEL_INSPECTORS: dict[str, Inspector] = {name: resolve(f.inspector) for name, f in MODEL_FORMATS.items()}
DATASET_INSPECTORS: dict[str, Inspector] = {
    "npz": inspect_npz,
    "imagefolder": inspect_imagefolder,
    "text": inspect_text,
}

__all__ = [
    "DATASET_INSPECTORS",
    "MODEL_INSPECTORS",
    "InspectionError",
    "Inspector",
    "hf_interface",
    "inspect_hf",
    "inspect_imagefolder",
    "inspect_npz",
    "inspect_onnx",
    "inspect_text",
]
