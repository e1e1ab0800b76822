"""What a job hands back besides its report: the output ONNX model described in its own metadata, and, for a
Hugging Face model, ``bundle.zip`` laid out as Optimum's ``ORTModelFor…from_pretrained`` loads a folder.

Every output model gets ``metadata_props`` (read with ``InferenceSession.get_modelmeta().custom_metadata_map``):
``modelpress.task``, ``modelpress.labels`` (JSON list of class names by output index, when known),
``modelpress.inputs`` / ``modelpress.outputs`` (JSON ``[{name, dtype, shape}]``), ``modelpress.job`` and
``modelpress.source_model``; graph inputs and outputs get a one-line ``doc_string``. A model whose weights sit in
external-data files is rewritten as one file when it fits in protobuf's 2 GiB, so ``model.onnx`` downloads alone.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from models.formats import model_format
from models.spec import CLASSIFICATION_TASKS
from storage import archive, onnx_files

if TYPE_CHECKING:
    from models.spec import JobSpec

# The files of a transformers folder a tokenizer (or image processor) loads from; copied into the bundle.
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
    "preprocessor_config.json", "chat_template.jinja", "generation_config.json",
})
MAX_SIDE_FILE = 256 * 1024 * 1024


def label_names(spec: JobSpec, model_meta: dict[str, Any], classes: list[str] | None) -> list[str] | None:
    """Class names by output index: the classes the job's data was encoded with, else the hf config's id2label."""
    if spec.task not in CLASSIFICATION_TASKS:
        return None
    if classes:
        return [str(c) for c in classes]
    id2label = (model_meta.get("config") or {}).get("id2label")
    if isinstance(id2label, dict) and id2label:
        try:
            return [str(v) for _, v in sorted(((int(k), v) for k, v in id2label.items()))]
        except (TypeError, ValueError):
            return None
    return None


def _describe(spec_: dict[str, Any], role: str, labels: list[str] | None, task: str) -> str:
    shape = ", ".join("?" if d is None else str(d) for d in spec_.get("shape") or [])
    text = f"{role} {spec_['name']}: {spec_.get('dtype') or '?'} [{shape}]"
    if role == "output" and labels and task in CLASSIFICATION_TASKS:
        shown = ", ".join(labels[:20]) + (", ..." if len(labels) > 20 else "")
        text += f"; scores over {len(labels)} classes in order: {shown} (see modelpress.labels)"
    return text


def stamp(path: Path, spec: JobSpec, *, job_id: str, labels: list[str] | None) -> dict[str, str]:
    """Write the description into the ONNX file at ``path`` (external data untouched); the props written."""
    import onnx

    from worker.formats.onnx_model import graph_inputs, tensor_specs

    model = onnx.load(str(path), load_external_data=False)
    inputs, outputs = tensor_specs(graph_inputs(model)), tensor_specs(model.graph.output)
    props = {
        "modelpress.task": spec.task,
        "modelpress.inputs": json.dumps(inputs),
        "modelpress.outputs": json.dumps(outputs),
        "modelpress.job": job_id,
        "modelpress.source_model": spec.model,
    }
    if any(p.key == "modelpress.tasks" for p in model.metadata_props):
        labels = None  # a multi-task model names each output's labels in modelpress.tasks
    if labels:
        props["modelpress.labels"] = json.dumps(labels)
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    by_name = {v.name: v for v in model.graph.input}
    for s in inputs:
        by_name[s["name"]].doc_string = _describe(s, "input", labels, spec.task)
    for value, s in zip(model.graph.output, outputs, strict=True):
        value.doc_string = _describe(s, "output", labels, spec.task)
    model.doc_string = f"optimized by modelpress job {job_id} from {spec.model} ({spec.task})"
    onnx.save_model(model, str(path))
    return props


def single_file(path: Path) -> Path:
    """The model at ``path`` as one file (``<stem>-single.onnx`` next to it) when it has external data that fits
    in 2 GiB; else ``path`` itself (a model past 2 GiB keeps its data files, stored as artifacts by name)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    externals = onnx_files.external_data_files(model, path.parent)
    if not externals or path.stat().st_size + sum(f.stat().st_size for f in externals) > onnx_files.PROTOBUF_LIMIT:
        return path
    out = path.with_name(f"{path.stem}-single.onnx")
    if not _splice(model, path.parent, out):  # external data outside graph.initializer: the plain way
        onnx.load_external_data_for_model(model, str(path.parent))
        onnx.save_model(model, str(out), save_as_external_data=False)
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _splice(model: Any, base: Path, out: Path) -> bool:
    """Write ``model`` (loaded without its external data) as one file, copying each initializer's bytes from
    its data file in blocks into the protobuf's ``raw_data`` field: memory stays at the graph, not the weights
    (loading them and serialising held twice the model). False, writing nothing, when external data sits
    anywhere but ``graph.initializer``."""
    import onnx

    inits = list(model.graph.initializer)
    sources: list[tuple[bytes, Path | None, int, int]] = []
    for t in inits:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            sources.append((t.SerializeToString(), None, 0, 0))
            continue
        info = {e.key: e.value for e in t.external_data}
        file = (base / info["location"]).resolve()
        if not file.is_relative_to(base.resolve()):
            return False
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else file.stat().st_size - offset
        bare = onnx.TensorProto()
        bare.CopyFrom(t)
        del bare.external_data[:]
        bare.ClearField("data_location")
        sources.append((bare.SerializeToString(), file, offset, length))
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    del rest.graph.initializer[:]
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(rest)):
        return False
    graph_rest = rest.graph.SerializeToString()
    rest.ClearField("graph")
    heads: list[bytes] = []
    graph_len = len(graph_rest)
    for tensor, _, _, length in sources:
        data_head = (b"\x4a" + _varint(length)) if length else b""  # field 9 (raw_data), length-delimited
        body = len(tensor) + len(data_head) + length
        heads.append(b"\x2a" + _varint(body) + tensor + data_head)  # field 5 (initializer)
        graph_len += len(heads[-1]) + length
    buf = memoryview(bytearray(16 * 1024 * 1024))  # one block, reused
    with open(out, "wb") as fh:
        fh.write(rest.SerializeToString())
        fh.write(b"\x3a" + _varint(graph_len))  # field 7 (graph)
        fh.write(graph_rest)
        for head, (_, file, offset, length) in zip(heads, sources, strict=True):
            fh.write(head)
            if file is not None and length:
                with open(file, "rb") as src:
                    src.seek(offset)
                    left = length
                    while left:
                        got = src.readinto(buf[: min(left, len(buf))])
                        if not got:
                            raise OSError(f"{file.name} ends before offset {offset} + {length}")
                        fh.write(buf[:got])
                        left -= got
    return True


def _all_tensors(model: Any) -> list[Any]:
    """Every TensorProto of a model outside ``graph.initializer`` (attributes, subgraphs, their initializers)."""
    found: list[Any] = []

    def graph(g: Any) -> None:
        found.extend(g.initializer)
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    found.append(a.t)
                found.extend(a.tensors)
                if a.HasField("g"):
                    graph(a.g)
                for sub in a.graphs:
                    graph(sub)

    graph(model.graph)
    return found


def external_files(path: Path) -> dict[str, Path]:
    """The external-data files of the ONNX model at ``path`` by their location (relative to its folder)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    root = path.parent.resolve()
    return {f.relative_to(root).as_posix(): f for f in onnx_files.external_data_files(model, path.parent)}


def model_archive(model: Path, externals: dict[str, Path], dest: Path) -> Path:
    """``model.onnx`` and its external-data files (by their relative locations) in one uncompressed zip
    (zip64 past 4 GiB): unpacked anywhere, the ONNX file finds its data beside it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.write(model, "model.onnx")
        for name, path in sorted(externals.items()):
            zf.write(path, name)
    return dest


def _hf_side_files(hf_archive: Path, meta: dict[str, Any]) -> dict[str, bytes]:
    """config.json and the tokenizer / preprocessor files at the top of the uploaded hf archive, by name."""
    entries = archive.list_entries(hf_archive, archive.HF_LIMITS)
    root = str(meta["root"]) if meta.get("root") is not None else archive.common_root(entries)
    out: dict[str, bytes] = {}
    for entry in entries:
        if entry.is_dir or not entry.name.startswith(root):
            continue
        rel = entry.name[len(root):]
        if "/" in rel or (rel != "config.json" and rel not in TOKENIZER_FILES):
            continue
        out[rel] = archive.read_member(hf_archive, entry, MAX_SIDE_FILE)
    return out


def hf_bundle(model_path: Path, hf_archive: Path, meta: dict[str, Any], labels: list[str] | None, dest: Path) -> Path:
    """``dest`` (a zip): ``model.onnx`` (one file), ``config.json`` with ``id2label``/``label2id`` and the upload's
    tokenizer files, the folder layout Optimum's ``ORTModelFor…from_pretrained`` and transformers' Auto* read."""
    side = _hf_side_files(hf_archive, meta)
    config = json.loads(side.pop("config.json", b"{}") or b"{}")
    if labels:
        config["id2label"] = {str(i): name for i, name in enumerate(labels)}
        config["label2id"] = {name: i for i, name in enumerate(labels)}
        config["num_labels"] = len(labels)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(single_file(model_path), "model.onnx")
        zf.writestr("config.json", json.dumps(config, indent=2, sort_keys=True))
        for name, data in sorted(side.items()):
            zf.writestr(str(PurePosixPath(name)), data)
    return dest


def prepare(
    output_path: Path,
    spec: JobSpec,
    *,
    job_id: str,
    model_ref: tuple[Path, str, dict[str, Any]] | None,
    classes: list[str] | None,
    workdir: Path,
) -> dict[str, tuple[str, Path]]:
    """The model artifacts of a finished job by name (``model.onnx``; past 2 GiB also ``model.zip`` with its data
    files, and
    ``bundle.zip`` for an hf upload), the output described in its metadata."""
    model_meta = model_ref[2] if model_ref else {}
    labels = label_names(spec, model_meta, classes)
    stamp(output_path, spec, job_id=job_id, labels=labels)
    model_file = single_file(output_path)
    files: dict[str, tuple[str, Path]] = {"model.onnx": ("model", model_file)}
    if model_file == output_path and (externals := external_files(output_path)):
        # past protobuf's 2 GiB the weights must stay in their own files: one archive carries them together
        files["model.zip"] = ("model-archive", model_archive(output_path, externals, workdir / "model.zip"))
    if model_ref is not None and model_format(model_ref[1]).transformers:
        files["bundle.zip"] = ("bundle", hf_bundle(model_file, model_ref[0], model_meta, labels,
                                                   workdir / "bundle.zip"))
    return files
