"""Every bad input of the audit, in one table, through the real upload and submit routes.

Each answer is a 4xx problem+json whose ``code`` and ``detail`` name the problem (the member, the array,
the field), and nothing is left behind: no model, dataset or job row, no blob, no staged temp file.
"""

from __future__ import annotations

import io
import pickle
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto

from tests.api.builders import (
    BERT_CONFIG,
    hf_files,
    npz_bytes,
    onnx_bytes,
    onnx_function_external_bytes,
    tar_gz_bytes,
    zip_bytes,
)
from tests.api.conftest import blobs, temp_files

PICKLE = pickle.dumps({"weight": [1.0, 2.0], "__reduce__": "os.system"})
BOMB_BYTES = 64 * 1024 * 1024  # zeros: deflate shrinks them about 1000x, far past the 200x ratio cap


def _onnx_external(location: str) -> bytes:
    """The tiny ONNX graph with its weight ``w`` moved to an external file at ``location``."""
    model = onnx.load_model_from_string(onnx_bytes())
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    entry = w.external_data.add()
    entry.key, entry.value = "location", location
    return model.SerializeToString()


def _torch_save_like() -> bytes:
    """What ``torch.save`` writes: a zip whose ``archive/data.pkl`` is a pickle."""
    return zip_bytes({"archive/data.pkl": PICKLE, "archive/version": b"3\n"})


def _zip_with_symlink(files: dict[str, bytes], link: str, target: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        info = zipfile.ZipInfo(link)
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, target)
    return buf.getvalue()


def _zip_bomb(files: dict[str, bytes], name: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, data in files.items():
            zf.writestr(n, data)
        with zf.open(name, "w", force_zip64=True) as member:
            chunk = bytes(1024 * 1024)
            for _ in range(BOMB_BYTES // len(chunk)):
                member.write(chunk)
    return buf.getvalue()


def _tar_gz_bomb(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("pad.safetensors")
        info.size = BOMB_BYTES
        tf.addfile(info, io.BytesIO(bytes(BOMB_BYTES)))
    return buf.getvalue()


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (8, 8)).save(out, format="PNG")
    return out.getvalue()


def _hf(**extra: bytes) -> dict[str, bytes]:
    files = hf_files()
    files.update(extra)
    return files


def _without_safetensors(**extra: bytes) -> dict[str, bytes]:
    files = {k: v for k, v in hf_files().items() if not k.endswith(".safetensors")}
    files.update(extra)
    return files


@dataclass(frozen=True)
class Case:
    """One bad request: where it goes, its body, and the answer that names the problem."""

    id: str
    path: str
    body: Callable[[], bytes | Iterator[bytes]]
    status: int
    code: str
    detail: tuple[str, ...]  # every one of these appears in ``detail`` (lower-cased)
    params: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    method: str = "PUT"
    multipart: bool = False  # POST as ``curl -F file=@… -F format=…`` instead of a raw PUT body


def _model(fmt: str) -> dict[str, str]:
    return {"format": fmt, "name": "bad"}


def _big_spec() -> Iterator[bytes]:
    """A 50 MB JSON job spec, sent chunked (no Content-Length to refuse it by)."""
    yield b'{"model": "mdl_x", "task": "generic", "steps": [], "pad": "'
    chunk = b"a" * (1024 * 1024)
    for _ in range(50):
        yield chunk
    yield b'"}'


CASES = [
    # -- pickled weights, under every model format (and the dataset formats that could carry one) --
    Case("onnx-pickle", "/v1/models", lambda: PICKLE, 422, "invalid_model", ("onnx",), _model("onnx")),
    Case("onnx-torch-save-zip", "/v1/models", _torch_save_like, 422, "invalid_model", ("onnx",), _model("onnx")),
    Case("hf-pytorch_model.bin", "/v1/models", lambda: zip_bytes(_without_safetensors(**{"pytorch_model.bin": PICKLE})),
         422, "invalid_model", ("pytorch_model.bin",), _model("hf")),
    Case("hf-pickle-beside-safetensors", "/v1/models", lambda: zip_bytes(_hf(**{"optimizer.pt": PICKLE})),
         422, "invalid_model", ("optimizer.pt",), _model("hf")),
    Case("hf-pickle-named-safetensors", "/v1/models",
         lambda: tar_gz_bytes(_without_safetensors(**{"model.safetensors": PICKLE})),
         422, "invalid_model", ("model.safetensors", "safetensors header"), _model("hf")),
    Case("npz-pickle", "/v1/datasets", lambda: PICKLE, 422, "invalid_dataset", ("npz", "pickled"), _model("npz")),
    Case("npz-object-array", "/v1/datasets",
         lambda: npz_bytes({"x": np.zeros((2, 4), np.float32), "meta": np.array([{"a": 1}, None], dtype=object)}),
         422, "invalid_dataset", ("meta", "object"), _model("npz")),
    # -- ONNX external data pointing outside the upload --
    Case("onnx-external-parent", "/v1/models", lambda: _onnx_external("../../modelpress.db"), 422, "invalid_model",
         ("'w'", "external data"), _model("onnx")),
    Case("onnx-external-absolute", "/v1/models", lambda: _onnx_external("/etc/passwd"), 422, "invalid_model",
         ("'w'", "external data"), _model("onnx")),
    Case("onnx-external-in-function", "/v1/models", lambda: onnx_function_external_bytes(), 422, "invalid_model",
         ("'c'", "external data"), _model("onnx")),
    # -- archive bombs --
    Case("hf-zip-bomb", "/v1/models", lambda: _zip_bomb(hf_files(), "pad.safetensors"), 422, "invalid_model",
         ("compression ratio",), _model("hf")),
    Case("hf-tar-gz-bomb", "/v1/models", lambda: _tar_gz_bomb(hf_files()), 422, "invalid_model",
         ("compression ratio",), _model("hf")),
    Case("imagefolder-zip-bomb", "/v1/datasets",
         lambda: _zip_bomb({"cat/a.png": _png(), "dog/b.png": _png()}, "cat/huge.png"), 422, "invalid_dataset",
         ("compression ratio",), _model("imagefolder")),
    Case("npz-bomb", "/v1/datasets", lambda: _zip_bomb({}, "x.npy"), 422, "invalid_dataset",
         ("compression ratio",), _model("npz")),
    # -- links and `..` names --
    Case("hf-tar-symlink", "/v1/models", lambda: tar_gz_bytes(hf_files(), symlinks={"vocab2.txt": "/etc/passwd"}),
         422, "invalid_model", ("vocab2.txt", "link"), _model("hf")),
    Case("hf-tar-hardlink", "/v1/models",
         lambda: tar_gz_bytes(hf_files(), symlinks={"vocab2.txt": "/etc/passwd"}, hard=True),
         422, "invalid_model", ("vocab2.txt", "link"), _model("hf")),
    Case("hf-zip-symlink", "/v1/models", lambda: _zip_with_symlink(hf_files(), "vocab2.txt", "/etc/passwd"),
         422, "invalid_model", ("vocab2.txt", "link"), _model("hf")),
    Case("hf-dotdot", "/v1/models", lambda: tar_gz_bytes(_hf(**{"../escape.txt": b"x"})), 422, "invalid_model",
         ("../escape.txt", "'..'"), _model("hf")),
    Case("hf-absolute", "/v1/models", lambda: zip_bytes(_hf(**{"/tmp/escape.txt": b"x"})), 422, "invalid_model",
         ("/tmp/escape.txt", "absolute path"), _model("hf")),
    Case("imagefolder-dotdot", "/v1/datasets", lambda: zip_bytes({"cat/a.png": _png(), "../dog/b.png": _png()}),
         422, "invalid_dataset", ("../dog/b.png", "'..'"), _model("imagefolder")),
    Case("imagefolder-symlink", "/v1/datasets",
         lambda: _zip_with_symlink({"cat/a.png": _png(), "dog/b.png": _png()}, "dog/c.png", "/etc/passwd"),
         422, "invalid_dataset", ("dog/c.png", "link"), _model("imagefolder")),
    # -- custom code in a config --
    Case("hf-auto_map", "/v1/models",
         lambda: zip_bytes(hf_files({**BERT_CONFIG, "auto_map": {"AutoModel": "modeling_evil.EvilModel"}})),
         422, "invalid_model", ("auto_map",), _model("hf")),
    # -- the multipart route (curl -F) refuses the same --
    Case("multipart-hf-pickle", "/v1/models", lambda: zip_bytes(_without_safetensors(**{"pytorch_model.bin": PICKLE})),
         422, "invalid_model", ("pytorch_model.bin",), _model("hf"), method="POST", multipart=True),
    Case("multipart-npz-object-array", "/v1/datasets",
         lambda: npz_bytes({"x": np.zeros((2, 4), np.float32), "meta": np.array([{"a": 1}, None], dtype=object)}),
         422, "invalid_dataset", ("meta", "object"), _model("npz"), method="POST", multipart=True),
    Case("multipart-zip-bomb", "/v1/models", lambda: _zip_bomb(hf_files(), "pad.safetensors"), 422, "invalid_model",
         ("compression ratio",), _model("hf"), method="POST", multipart=True),
    # -- job specs --
    Case("spec-50MB", "/v1/jobs", _big_spec, 413, "body_too_large", ("larger than the limit",),
         content_type="application/json", method="POST"),
    Case("spec-50MB-declared", "/v1/jobs", lambda: b"{" + b" " * (50 * 1024 * 1024) + b"}", 413, "body_too_large",
         ("larger than the limit",), content_type="application/json", method="POST"),
    Case("spec-text-plain", "/v1/jobs", lambda: b"model: mdl_x", 415, "unsupported_media_type", ("text/plain",),
         content_type="text/plain", method="POST"),
    Case("spec-form", "/v1/jobs", lambda: b"model=mdl_x", 415, "unsupported_media_type",
         ("application/x-www-form-urlencoded",), content_type="application/x-www-form-urlencoded", method="POST"),
]


def _rows() -> dict[str, int]:
    from sqlalchemy import func, select

    from models.db import session_scope
    from models.tables import Dataset, Job, Model

    with session_scope() as s:
        return {t.__tablename__: int(s.scalar(select(func.count()).select_from(t)) or 0) for t in (Model, Dataset, Job)}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_is_a_named_4xx_and_leaves_nothing(client: TestClient, storage_dir: Path, case: Case) -> None:
    if case.multipart:
        body = case.body()
        assert isinstance(body, bytes)
        r = client.post(case.path, data=case.params, files={"file": ("upload.bin", body)})
    else:
        headers = {"content-type": case.content_type} if case.content_type else {}
        r = client.request(case.method, case.path, params=case.params, content=case.body(), headers=headers)
    assert r.status_code == case.status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    problem = r.json()
    assert problem["status"] == case.status and problem["code"] == case.code, problem
    for words in case.detail:
        assert words.lower() in problem["detail"].lower(), (words, problem["detail"])
    assert "Traceback" not in r.text
    assert _rows() == {"models": 0, "datasets": 0, "jobs": 0}
    assert blobs(storage_dir) == [] and temp_files(storage_dir) == []


def test_the_table_covers_every_upload_format() -> None:
    """A new model or dataset format gets its bad inputs here too."""
    from api.inspection import DATASET_INSPECTORS, MODEL_INSPECTORS

    models = {c.params.get("format") for c in CASES if c.path == "/v1/models"}
    datasets = {c.params.get("format") for c in CASES if c.path == "/v1/datasets"}
    assert set(MODEL_INSPECTORS) <= models, set(MODEL_INSPECTORS) - models
    assert set(DATASET_INSPECTORS) - {"text"} <= datasets  # text (JSONL/CSV) is parsed as text, never unpickled
