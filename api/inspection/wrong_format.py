"""Uploads in a form we refuse or under the wrong format: a message that says what to do instead.

A PyTorch pickle (``torch.save``: a legacy pickle stream or its zip form with ``data.pkl``) is never loaded,
since unpickling runs code; the message says how to export the model instead. A Hugging Face folder sent as
``onnx`` (or an ONNX archive sent as ``hf``) is named as such, with the format to use.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from storage import archive

PICKLE_REFUSED = (
    "this is a PyTorch pickle (torch.save), and pickles are refused: loading one runs code. Export the model "
    "to ONNX instead (torch.onnx.export(model, (example_input,), 'model.onnx'); upload model.onnx as format "
    "onnx, zipped with model.onnx.data when the exporter writes one), or save its weights as safetensors with "
    "its config.json (transformers: model.save_pretrained(folder)) and upload that folder as a zip or tar.gz, "
    "format hf"
)
HF_AS_ONNX = ("this looks like a Hugging Face model (config.json and weights, no .onnx file); "
              "use format hf")
ONNX_AS_HF = "this looks like an ONNX model (a .onnx file, no config.json); use format onnx"


def is_pickle_stream(path: Path) -> bool:
    """Whether the file starts like a pickle of protocol 2 to 5 (how torch.save wrote files before zips)."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _names(path: Path) -> list[str] | None:
    """The archive's member base names (OS clutter left out); None for a non-archive or an unreadable one."""
    if archive.detect_kind(path) is None:
        return None
    try:
        entries = archive.list_entries(path, archive.HF_LIMITS)
    except archive.ArchiveError:
        return None  # the format's own inspector says what is wrong with it
    return [PurePosixPath(e.name).name for e in entries if not e.is_dir and not archive.is_junk(e.name)]


def is_torch_zip(names: list[str]) -> bool:
    """torch.save's zip form: ``<name>/data.pkl`` beside ``<name>/data/<n>`` tensors."""
    return "data.pkl" in names and "config.json" not in names


def wrong_format_hint(path: Path, declared: str) -> str | None:
    """What to do instead when the upload at ``path`` cannot be a model of ``declared`` format; None when it may be."""
    names = _names(path)
    if names is None:
        return PICKLE_REFUSED if is_pickle_stream(path) else None
    if is_torch_zip(names):
        return PICKLE_REFUSED
    has_onnx = any(n.lower().endswith(".onnx") for n in names)
    has_config = "config.json" in names
    if declared == "onnx" and not has_onnx and has_config:
        return HF_AS_ONNX
    if declared == "hf" and has_onnx and not has_config:
        return ONNX_AS_HF
    return None
