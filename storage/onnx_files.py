"""Safe readers of stored ONNX files (docs/architecture.md §8, security rules), shared by the API's inspection and the worker.

Parse without external data, validate every external-data location (relative, no ``..``, no links,
inside the model's own folder), then ``onnx.checker``. onnx + stdlib only: no torch, no onnxruntime.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import onnx
from onnx import TensorProto

from storage import archive

# The protobuf limit: above it a model must be checked by path and saved with external data.
PROTOBUF_LIMIT = 2**31 - 1


class OnnxFileError(ValueError):
    """The bytes are not a valid, safe ONNX model; the message says why."""


def _subgraphs(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.GraphProto]:
    """Every graph nested in ``nodes``' attributes (If, Loop, Scan bodies), recursively."""
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from all_graphs(g)


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph nested in its nodes' attributes (If, Loop, Scan bodies)."""
    yield graph
    yield from _subgraphs(graph.node)


def _attribute_tensors(attributes: Iterable[onnx.AttributeProto]) -> Iterator[TensorProto]:
    for attr in attributes:
        if attr.type == onnx.AttributeProto.TENSOR:
            yield attr.t
        elif attr.type == onnx.AttributeProto.TENSORS:
            yield from attr.tensors


def all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor of the model that may carry data: initializers, sparse initializers, tensor attributes.

    Model-local functions count: their nodes (a Constant's ``value``), their attribute defaults and the
    subgraphs inside them carry tensors too, and onnx.checker would resolve their locations itself.
    """
    graphs = list(all_graphs(model.graph))
    for fn in model.functions:
        yield from _attribute_tensors(fn.attribute_proto)
        for node in fn.node:
            yield from _attribute_tensors(node.attribute)
        graphs.extend(_subgraphs(fn.node))
    for graph in graphs:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            yield from _attribute_tensors(node.attribute)


def _external_location(tensor: TensorProto) -> str | None:
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    raise OnnxFileError(f"tensor {tensor.name!r} is stored externally but names no location")


def external_data_files(model: onnx.ModelProto, base_dir: Path) -> list[Path]:
    """The validated external-data files ``model`` (loaded without external data) refers to, in order."""
    root = base_dir.resolve()
    files: dict[str, Path] = {}
    for tensor in all_tensors(model):
        location = _external_location(tensor)
        if location is None:
            continue
        if location not in files:
            files[location] = _validate_location(location, base_dir, root, tensor.name)
        _check_span(tensor, location, files[location])
    return list(files.values())


def _check_span(tensor: TensorProto, location: str, file: Path) -> None:
    """The tensor's ``offset`` + ``length`` must lie inside its data file (ORT would fail on it at load time)."""
    info = {e.key: e.value for e in tensor.external_data}
    try:
        offset, length = int(info.get("offset") or 0), int(info["length"]) if "length" in info else None
    except ValueError as e:
        raise OnnxFileError(f"tensor {tensor.name!r}: external data offset/length are not integers") from e
    size = file.stat().st_size
    end = offset + (length or 0)
    if offset < 0 or (length is not None and length < 0) or end > size:
        raise OnnxFileError(
            f"tensor {tensor.name!r}: external data ({location!r}, offset {offset}, length {length}) "
            f"runs past the end of the file ({size} bytes)"
        )


def _validate_location(location: str, base_dir: Path, root: Path, tensor: str) -> Path:
    bad = f"tensor {tensor!r}: external data location {location!r}"
    if not location or "\x00" in location:
        raise OnnxFileError(f"{bad} is empty or malformed")
    if (
        location.startswith(("/", "\\"))
        or os.path.isabs(location)
        or (len(location) > 1 and location[1] == ":")
    ):
        raise OnnxFileError(f"{bad} is absolute; it must be relative to the model's folder")
    parts = location.replace("\\", "/").split("/")
    if ".." in parts:
        raise OnnxFileError(f"{bad} leaves the model's folder ('..')")
    current = base_dir
    for part in parts:
        if part in ("", "."):
            continue
        current = current / part
        if current.is_symlink():
            raise OnnxFileError(f"{bad} goes through a link")
    target = current.resolve()
    if root != target and root not in target.parents:
        raise OnnxFileError(f"{bad} is outside the model's folder")
    if not target.is_file():
        raise OnnxFileError(f"{bad} does not exist or is not a regular file")
    return target


def safe_load(path: Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file safely: parse without external data, validate its locations, run onnx.checker."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise OnnxFileError(f"{path.name}: not a regular file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf decode errors have no common base class
        raise OnnxFileError(f"not an ONNX model: {type(e).__name__}: {e}") from e
    base_dir = path.parent
    externals = external_data_files(model, base_dir)
    try:
        total = path.stat().st_size + sum(f.stat().st_size for f in externals)
        if externals or total > PROTOBUF_LIMIT:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise OnnxFileError(f"onnx.checker rejected the model: {e}") from e
    if externals and load_external_data:
        onnx.load_external_data_for_model(model, str(base_dir))
    return model


# ----------------------------------------------------------------------------------------------------------
# An ONNX model with its external data, uploaded as one zip or tar.gz (torch.onnx.export's default output:
# ``model.onnx`` + ``model.onnx.data``).

ONNX_ARCHIVE_LIMITS = archive.Limits(max_total_bytes=64 * 1024**3, max_entries=10_000, max_ratio=200.0)


def archive_model_entry(entries: list[archive.Entry]) -> archive.Entry:
    """The one ``.onnx`` file among an archive's members (OS clutter ignored); OnnxFileError when none or several."""
    models = [e for e in entries if not e.is_dir and e.name.lower().endswith(".onnx") and not archive.is_junk(e.name)]
    if not models:
        raise OnnxFileError("the archive holds no .onnx file; put the model file and its external data in it")
    if len(models) > 1:
        names = ", ".join(repr(e.name) for e in models[:4])
        raise OnnxFileError(f"the archive holds {len(models)} .onnx files ({names}); upload one model per archive")
    return models[0]


def extract_archive(path: Path, dest: Path, limits: archive.Limits = ONNX_ARCHIVE_LIMITS) -> Path:
    """Extract an ONNX archive into the empty folder ``dest`` and validate it; the model file's path in ``dest``.

    The archive's members pass the archive rules (caps, no links, no ``..``, no absolute names); the model's
    external-data locations must then name regular files inside the model's own folder (``safe_load``).
    """
    try:
        entries = archive.list_entries(Path(path), limits)
        model_entry = archive_model_entry(entries)
        archive.extract(Path(path), dest, limits)
    except archive.ArchiveError as exc:
        raise OnnxFileError(f"unsafe or unreadable archive: {exc}") from exc
    model_path = Path(dest) / model_entry.name
    safe_load(model_path, load_external_data=False)
    return model_path


def check_archive_layout(path: Path, dest: Path, limits: archive.Limits = ONNX_ARCHIVE_LIMITS) -> Path:
    """Validate an ONNX archive without inflating its data: the model file is written to the empty folder ``dest``,
    every other member becomes a sparse placeholder of its declared size, then the same checks as ``safe_load``
    (locations inside the model's folder, naming regular files, offsets within them, onnx.checker) run there.

    What the API needs to accept an upload; the worker extracts for real (``extract_archive``)."""
    try:
        entries = archive.list_entries(Path(path), limits)
        model_entry = archive_model_entry(entries)
        base = Path(dest).resolve()
        for entry in entries:
            if entry.is_dir or archive.is_junk(entry.name):
                continue
            target = base / entry.name  # names are validated relative POSIX paths (archive.safe_name)
            target.parent.mkdir(parents=True, exist_ok=True)
            if entry.name == model_entry.name:
                with archive.open_member(Path(path), entry) as src, open(target, "xb") as out:
                    copied = _copy_capped(src, out, entry.size)
                if copied != entry.size:
                    raise archive.ArchiveError(f"member {entry.name!r} is not the size its header says")
            else:
                with open(target, "xb") as out:
                    out.truncate(entry.size)
    except archive.ArchiveError as exc:
        raise OnnxFileError(f"unsafe or unreadable archive: {exc}") from exc
    model_path = base / model_entry.name
    safe_load(model_path, load_external_data=False)
    return model_path


def _copy_capped(src: IO[bytes], out: IO[bytes], declared: int) -> int:
    written = 0
    while chunk := src.read(1024 * 1024):
        written += len(chunk)
        if written > declared:
            break
        out.write(chunk)
    return written


def is_archive(path: Path) -> bool:
    """Whether the stored upload at ``path`` is a zip or tar archive (an ONNX file is neither)."""
    return archive.detect_kind(Path(path)) is not None
