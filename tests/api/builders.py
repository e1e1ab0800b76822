"""Small inputs for the API tests, built in memory: ONNX graphs, npz files, archives, DB rows."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zipfile
from datetime import timedelta
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.db import session_scope
from models.ids import new_id
from models.tables import Artifact, Dataset, Job, JobEvent, Model, utcnow


def onnx_bytes(in_features: int = 4, out_features: int = 3, input_name: str = "x", seed: int = 0) -> bytes:
    """A tiny valid ONNX graph: y = x @ w + b, with a dynamic batch axis."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(in_features, out_features)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(out_features, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", [input_name, "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_features])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def onnx_external_bytes() -> bytes:
    """An ONNX graph whose weight claims to live in an external file."""
    model = onnx.load_model_from_string(onnx_bytes())
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    entry = w.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    return model.SerializeToString()


def onnx_function_external_bytes(location: str = "../../modelpress.db") -> bytes:
    """A valid ONNX graph calling a model-local function whose Constant node's tensor lives at ``location``."""
    value = helper.make_tensor("c", TensorProto.FLOAT, [3], [0.0, 0.0, 0.0])
    value.ClearField("float_data")
    value.data_location = TensorProto.EXTERNAL
    entry = value.external_data.add()
    entry.key, entry.value = "location", location
    fn = helper.make_function(
        "local.fns", "AddConst", ["a"], ["b"],
        [helper.make_node("Constant", [], ["k"], value=value), helper.make_node("Add", ["a", "k"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [helper.make_node("AddConst", ["x"], ["y"], domain="local.fns")],
        "fn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, functions=[fn], producer_name="tests",
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local.fns", 1)])
    model.ir_version = 8
    return model.SerializeToString()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An npz archive of ``arrays``."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]]) -> bytes:
    """A safetensors file written by hand: 8-byte LE header length, JSON header, zero-filled data."""
    sizes = {"F32": 4, "F16": 2, "I64": 8}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = int(np.prod(shape)) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


BERT_CONFIG = {
    "model_type": "bert",
    "architectures": ["BertForSequenceClassification"],
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "vocab_size": 30,
    "type_vocab_size": 2,
    "id2label": {"0": "neg", "1": "pos"},
    "label2id": {"neg": 0, "pos": 1},
}


def zip_bytes(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip archive holding ``files``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_gz_bytes(files: dict[str, bytes], symlinks: dict[str, str] | None = None, hard: bool = False) -> bytes:
    """A gzip-compressed tar archive holding ``files`` (and optional links name -> target: hard ones with ``hard``)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


def hf_files(config: dict[str, Any] | None = None, root: str = "") -> dict[str, bytes]:
    """The files of a tiny Hugging Face model folder (config + one safetensors file)."""
    weights = safetensors_bytes({"embeddings.weight": ("F32", [30, 8]), "classifier.weight": ("F32", [2, 8])})
    return {
        f"{root}config.json": json.dumps(config or BERT_CONFIG).encode(),
        f"{root}model.safetensors": weights,
        f"{root}vocab.txt": b"[PAD]\n[UNK]\nhello\n",
    }


def insert_model(
    owner: str = "local",
    inputs: list[dict[str, Any]] | None = None,
    outputs: list[dict[str, Any]] | None = None,
    format: str = "onnx",
) -> str:
    """A model row inserted directly (for job tests that need no upload)."""
    model_id = new_id("mdl")
    meta = {"inputs": inputs or [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
            "outputs": outputs or [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}]}
    with session_scope() as s:
        s.add(Model(id=model_id, owner=owner, name="m", format=format, sha256=hashlib.sha256(model_id.encode()).hexdigest(),
                    size_bytes=1, storage_key="0" * 64, meta=meta))
    return model_id


def insert_dataset(owner: str = "local", format: str = "npz", meta: dict[str, Any] | None = None) -> str:
    """A dataset row inserted directly; ``meta`` is what inspection would have stored (default: 8 x [4] floats)."""
    dataset_id = new_id("ds")
    if meta is None:
        meta = {"num_samples": 8, "fields": {"x": {"dtype": "float32", "shape": [8, 4]}}}
    with session_scope() as s:
        s.add(Dataset(id=dataset_id, owner=owner, name="d", format=format,
                      sha256=hashlib.sha256(dataset_id.encode()).hexdigest(), size_bytes=1, storage_key="0" * 64,
                      meta=meta))
    return dataset_id


def insert_job(model_id: str, status: str = "queued", owner: str = "local", created_offset_ms: int = 0) -> str:
    """A job row inserted directly, with one status event."""
    job_id = new_id("job")
    now = utcnow() + timedelta(milliseconds=created_offset_ms)
    with session_scope() as s:
        s.add(Job(id=job_id, owner=owner, status=status, phase=status, progress={}, spec={"model": model_id},
                  model_id=model_id, queue="cpu", created_at=now, updated_at=now))
        s.add(JobEvent(job_id=job_id, kind="status", message=status, data={"status": status}))
    return job_id


def add_events(job_id: str, n: int, kind: str = "log") -> list[int]:
    """Append ``n`` events to a job; their ids."""
    ids = []
    with session_scope() as s:
        for i in range(n):
            ev = JobEvent(job_id=job_id, kind=kind, message=f"{kind} {i}", data={"i": i})
            s.add(ev)
            s.flush()
            ids.append(ev.id)
    return ids


def set_status(job_id: str, status: str) -> None:
    """Move a job to ``status`` (as the worker would) and record the event."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.status = status
        s.add(JobEvent(job_id=job_id, kind="status", message=status, data={"status": status}))


def insert_artifact(job_id: str, data: bytes, name: str = "model.onnx", owner: str = "local") -> str:
    """An artifact row plus its blob in the configured store."""
    from storage import get_store

    blob = get_store().put([data])
    art_id = new_id("art")
    with session_scope() as s:
        s.add(Artifact(id=art_id, owner=owner, job_id=job_id, name=name, kind="model",
                       media_type="application/octet-stream", sha256=blob.sha256, size_bytes=blob.size_bytes,
                       storage_key=blob.key, meta={}))
    return art_id
