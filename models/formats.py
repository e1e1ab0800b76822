"""The model-format table: everything that differs between uploadable model formats, one row per format.

The API's upload inspection, the worker's loader, the stage cache, the passes that build on a transformers
module and the client's format inference all read it. A new model format is a row here, an inspector in
``api/inspection/`` and a loader in ``worker/formats/`` (plus their tests). Pure: the inspector and the loader
are named as ``module:function`` and imported where they run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from models.spec import Form

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")


def _onnx_file(suffix: str, members: Sequence[str]) -> bool:
    # an .onnx file, or an archive holding one (its external data beside it) and no config.json
    if suffix == ".onnx":
        return True
    names = [n.rsplit("/", 1)[-1] for n in members]
    return suffix in ARCHIVE_SUFFIXES and any(n.lower().endswith(".onnx") for n in names) and "config.json" not in names


@dataclass(frozen=True)
class ModelFormat:
    """One uploadable model format.

    ``inspector``: ``module:function`` reading a staged upload into its record's ``meta`` (the API, no torch);
    ``loader``: ``module:function`` loading it as a ``WorkingModel`` (the worker); ``form``: the form it loads
    in; ``transformers``: it loads as a transformers module (passes may use its config and layer structure);
    ``stage_cached``: the stage cache keeps its prefixes (a transformers structure does not survive the ONNX
    round trip an entry takes); ``claims(suffix, archive member names)``: whether the client infers this format
    for a file (rows are asked in order)."""

    name: str
    inspector: str
    loader: str
    form: Form
    transformers: bool
    stage_cached: bool
    claims: Callable[[str, Sequence[str]], bool]


_FORMATS = (
    ModelFormat("onnx", "api.inspection.onnx_model:inspect_onnx", "worker.formats.onnx_model:load", "onnx",
                transformers=False, stage_cached=True, claims=_onnx_file),
    ModelFormat("hf", "api.inspection.hf:inspect_hf", "worker.formats.hf:load", "torch",
                transformers=True, stage_cached=False, claims=lambda suffix, _: suffix in ARCHIVE_SUFFIXES),
)
MODEL_FORMATS: dict[str, ModelFormat] = {f.name: f for f in _FORMATS}


def resolve(ref: str) -> Callable[..., Any]:
    """The function a ``module:function`` reference of this table names (its module imported now)."""
    import importlib

    module, _, func = ref.partition(":")
    found: Callable[..., Any] = getattr(importlib.import_module(module), func)
    return found


def model_format(name: str) -> ModelFormat:
    """The row of model format ``name``; ValueError naming the known ones otherwise."""
    try:
        return MODEL_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown model format {name!r} (known: {', '.join(MODEL_FORMATS)})") from None
