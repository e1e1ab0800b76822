"""Dataset uploads: npz, imagefolder and text inspection, rejections, look-ups."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from models.db import session_scope
from models.tables import Dataset
from tests.api import builders
from tests.api.conftest import blobs, temp_files


def _rows() -> int:
    with session_scope() as s:
        return int(s.scalar(select(func.count()).select_from(Dataset)) or 0)


def test_npz_is_inspected(client: TestClient) -> None:
    x = np.zeros((10, 4), np.float32)
    labels = np.array([2, 0, 1, 10, 2, 0, 1, 1, 0, 2])
    r = client.put("/v1/datasets", params={"name": "eval", "format": "npz"},
                   content=builders.npz_bytes({"x": x, "labels": labels}))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["num_samples"] == 10
    assert body["fields"] == {"x": {"dtype": "float32", "shape": [10, 4]}, "labels": {"dtype": "int64", "shape": [10]}}
    assert body["classes"] == ["0", "1", "2", "10"]
    assert client.get(f"/v1/datasets/{body['id']}").json()["num_samples"] == 10


def test_npz_without_labels_and_string_labels(client: TestClient) -> None:
    r = client.put("/v1/datasets", params={"format": "npz"}, content=builders.npz_bytes({"x": np.ones((3, 2))}))
    assert r.status_code == 201 and r.json()["classes"] is None
    r = client.put("/v1/datasets", params={"format": "npz"},
                   content=builders.npz_bytes({"x": np.ones((3, 2)), "labels": np.array(["b", "a", "b"])}))
    assert r.status_code == 201 and r.json()["classes"] == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (builders.npz_bytes({"x": np.ones((3, 2)), "labels": np.arange(4)}), "disagree"),
        (builders.npz_bytes({"x": np.array([{"a": 1}], dtype=object)}), "pickle"),
        (builders.npz_bytes({"x": np.float32(1.0)}), "scalar"),
        (b"definitely not npz", "not a readable .npz"),
    ],
)
def test_npz_rejections(client: TestClient, storage_dir: Path, content: bytes, needle: str) -> None:
    r = client.put("/v1/datasets", params={"format": "npz"}, content=content)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_dataset" and needle in r.json()["detail"]
    assert _rows() == 0 and blobs(storage_dir) == [] and temp_files(storage_dir) == []


def test_imagefolder_zip(client: TestClient) -> None:
    files = {"pets/cat/1.png": b"\x89PNG", "pets/cat/2.jpg": b"jpg", "pets/dog/a.JPEG": b"jpeg",
             "pets/README.md": b"hi", "__MACOSX/._x": b""}
    r = client.put("/v1/datasets", params={"format": "imagefolder"}, content=builders.zip_bytes(files))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["num_samples"] == 3 and body["classes"] == ["cat", "dog"]
    assert body["meta"]["class_counts"] == {"cat": 2, "dog": 1}


def test_imagefolder_rejections(client: TestClient) -> None:
    deep = builders.zip_bytes({"cat/sub/1.png": b"x", "dog/2.png": b"y"})
    r = client.put("/v1/datasets", params={"format": "imagefolder"}, content=deep)
    assert r.status_code == 422 and "<class>/<image>" in r.json()["detail"]
    escape = builders.zip_bytes({"cat/1.png": b"x", "../evil/2.png": b"y"})
    r = client.put("/v1/datasets", params={"format": "imagefolder"}, content=escape)
    assert r.status_code == 422 and ".." in r.json()["detail"]
    bomb = builders.zip_bytes({"cat/1.png": bytes(8 * 1024 * 1024)})
    r = client.put("/v1/datasets", params={"format": "imagefolder"}, content=bomb)
    assert r.status_code == 422 and "compression ratio" in r.json()["detail"]
    assert _rows() == 0


def test_text_jsonl_and_csv(client: TestClient) -> None:
    lines = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": "meh", "label": 1}]
    jsonl = "\n".join(json.dumps(x) for x in lines).encode() + b"\n"
    r = client.put("/v1/datasets", params={"format": "text"}, content=jsonl)
    assert r.status_code == 201, r.text
    assert r.json()["num_samples"] == 3 and r.json()["classes"] == ["0", "1"]
    assert r.json()["fields"] == {"text": {"dtype": "str"}, "label": {"dtype": "int64"}}
    csv_data = b'text,label\n"hello, world",pos\nbye,neg\nagain,pos\n'
    r = client.put("/v1/datasets", params={"format": "text"}, content=csv_data)
    assert r.status_code == 201, r.text
    assert r.json()["num_samples"] == 3 and r.json()["classes"] == ["neg", "pos"]
    assert r.json()["meta"]["text_format"] == "csv"


def test_text_rejections(client: TestClient) -> None:
    r = client.put("/v1/datasets", params={"format": "text"}, content=b'{"text": "a"}\n{"nope": 1}\n')
    assert r.status_code == 422 and "line 2" in r.json()["detail"]
    r = client.put("/v1/datasets", params={"format": "text"}, content=b"\xff\xfe\x00garbage")
    assert r.status_code == 422 and r.json()["code"] == "invalid_dataset"


def test_multipart_dataset_and_list(client: TestClient) -> None:
    data = builders.npz_bytes({"x": np.ones((5, 2), np.float32)})
    r = client.post("/v1/datasets", files={"file": ("train.npz", data)}, data={"format": "npz"})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "train.npz" and r.json()["num_samples"] == 5
    page = client.get("/v1/datasets").json()
    assert [d["id"] for d in page["data"]] == [r.json()["id"]] and page["next_cursor"] is None
    bad = client.get("/v1/datasets", params={"limit": 0})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "limit"


def test_npz_compression_bomb_is_rejected(client: TestClient, storage_dir: Path) -> None:
    # 64 MiB of zeros deflates to ~64 KiB: the worker's np.load would inflate ~1000x what was uploaded.
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros((16, 1024 * 1024), dtype=np.float32), labels=np.zeros(16, dtype=np.int64))
    data = buf.getvalue()
    assert len(data) < 1024 * 1024
    r = client.put("/v1/datasets", params={"format": "npz"}, content=data)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_dataset" and "compression ratio" in r.json()["detail"]
    assert _rows() == 0 and blobs(storage_dir) == []
