"""Model uploads: ONNX and hf inspection, dedup, bad bytes, size limit, multipart, look-ups."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from models.db import session_scope
from models.tables import Model
from tests.api import builders
from tests.api.conftest import blobs, temp_files


def _model_rows() -> int:
    with session_scope() as s:
        return int(s.scalar(select(func.count()).select_from(Model)) or 0)


def test_onnx_upload_is_inspected(client: TestClient, storage_dir: Path) -> None:
    data = builders.onnx_bytes(in_features=4, out_features=3)
    r = client.put("/v1/models", params={"name": "tiny", "format": "onnx"}, content=data)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"].startswith("mdl_") and r.headers["location"] == f"/v1/models/{body['id']}"
    assert body["sha256"] == hashlib.sha256(data).hexdigest() and body["size_bytes"] == len(data)
    assert body["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}]
    assert body["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}]
    assert body["meta"]["parameters"] == 4 * 3 + 3
    assert body["meta"]["opset"] == 17 and body["meta"]["ir_version"] == 8
    assert body["meta"]["producer"] == "tests"
    stored = storage_dir / body["sha256"][:2] / body["sha256"][2:4] / body["sha256"]
    assert stored.read_bytes() == data
    got = client.get(f"/v1/models/{body['id']}").json()
    assert got["inputs"] == body["inputs"] and got["meta"]["parameters"] == 15


def test_same_bytes_give_the_same_record(client: TestClient) -> None:
    data = builders.onnx_bytes()
    first = client.put("/v1/models", params={"name": "a", "format": "onnx"}, content=data)
    again = client.put("/v1/models", params={"name": "b", "format": "onnx"}, content=data)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"] and again.json()["name"] == "a"
    assert (first.json()["deduplicated"], again.json()["deduplicated"]) == (False, True)
    assert _model_rows() == 1


def test_not_onnx_is_422_and_leaves_nothing(client: TestClient, storage_dir: Path) -> None:
    r = client.put("/v1/models", params={"name": "junk", "format": "onnx"}, content=b"this is not a model" * 50)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == "invalid_model" and "not an ONNX model" in body["detail"]
    assert _model_rows() == 0 and blobs(storage_dir) == [] and temp_files(storage_dir) == []


def test_external_data_is_rejected(client: TestClient, storage_dir: Path) -> None:
    r = client.put("/v1/models", params={"format": "onnx"}, content=builders.onnx_external_bytes())
    assert r.status_code == 422 and r.json()["code"] == "invalid_model"
    assert "external data" in r.json()["detail"]
    assert _model_rows() == 0 and blobs(storage_dir) == []


@pytest.mark.parametrize("location", ["../../modelpress.db", "/etc/passwd", "modelpress.db"])
def test_external_data_inside_a_local_function_is_rejected(
    client: TestClient, storage_dir: Path, location: str
) -> None:
    r = client.put("/v1/models", params={"format": "onnx"}, content=builders.onnx_function_external_bytes(location))
    assert r.status_code == 422 and r.json()["code"] == "invalid_model", r.text
    assert "external data" in r.json()["detail"]
    assert _model_rows() == 0 and blobs(storage_dir) == [] and temp_files(storage_dir) == []


def test_chunked_upload_over_the_limit_is_413(
    client: TestClient, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_MAX_UPLOAD_BYTES", "1000")
    get_settings.cache_clear()

    def body() -> Iterator[bytes]:
        for _ in range(10):
            yield b"x" * 300

    r = client.put("/v1/models", params={"name": "big", "format": "onnx"}, content=body())
    assert r.status_code == 413
    assert r.json()["code"] == "upload_too_large" and "1000" in r.json()["detail"]
    assert "MODELPRESS_MAX_UPLOAD_BYTES" in r.json()["detail"] and "quota" in r.json()["detail"]
    assert _model_rows() == 0 and temp_files(storage_dir) == [] and blobs(storage_dir) == []
    # A declared Content-Length over the limit is refused before reading.
    r = client.put("/v1/models", params={"format": "onnx"}, content=b"y" * 1001)
    assert r.status_code == 413 and temp_files(storage_dir) == []


def test_multipart_upload(client: TestClient) -> None:
    data = builders.onnx_bytes(in_features=6)
    r = client.post(
        "/v1/models",
        files={"file": ("m.onnx", data, "application/octet-stream")},
        data={"name": "from-curl", "format": "onnx"},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["name"] == "from-curl" and body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["inputs"][0]["shape"] == ["batch", 6]
    # The same bytes with a format models do not have are refused, not answered with the existing row.
    again = client.post("/v1/models", files={"file": ("m.onnx", data, "application/octet-stream")},
                        data={"format": "npz"})
    assert again.status_code == 422 and again.json()["errors"][0]["field"] == "format"
    assert client.get(f"/v1/models/{body['id']}").status_code == 200  # the first record keeps its blob


def test_multipart_over_the_limit_and_bad_requests(
    client: TestClient, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_MAX_UPLOAD_BYTES", "2000")
    get_settings.cache_clear()
    r = client.post("/v1/models", files={"file": ("m.onnx", b"z" * 5000)}, data={"format": "onnx"})
    assert r.status_code == 413 and temp_files(storage_dir) == [] and _model_rows() == 0
    r = client.post("/v1/models", data={"format": "onnx", "name": "no file"})
    assert r.status_code in (415, 422) and r.json()["code"] in ("unsupported_media_type", "validation_error")
    r = client.post("/v1/models", files={"other": ("m.onnx", b"abc")}, data={"format": "onnx"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "file"
    r = client.post("/v1/models", files={"file": ("m.onnx", builders.onnx_bytes())}, data={"format": "tflite"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "format"
    assert _model_rows() == 0 and blobs(storage_dir) == []


def test_unknown_format_is_422_before_reading(client: TestClient) -> None:
    r = client.put("/v1/models", params={"format": "pt"}, content=b"anything")
    assert r.status_code == 422 and r.json()["errors"] == [
        {"field": "format", "message": "'pt' is not one of onnx, hf"}
    ]


def test_hf_zip_is_inspected(client: TestClient) -> None:
    data = builders.zip_bytes(builders.hf_files(root="my-bert/"))
    r = client.put("/v1/models", params={"name": "bert", "format": "hf"}, content=data)
    assert r.status_code == 201, r.text
    body = r.json()
    assert [i["name"] for i in body["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(i["dtype"] == "int64" and i["shape"] == ["batch", "sequence"] for i in body["inputs"])
    assert body["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 2]}]
    meta = body["meta"]
    assert meta["parameters"] == 30 * 8 + 2 * 8
    assert meta["config"]["model_type"] == "bert" and meta["config"]["num_labels"] == 2
    assert meta["root"] == "my-bert/" and meta["task"] == "text-classification" and meta["has_tokenizer"]


def test_hf_vision_tar_gz(client: TestClient) -> None:
    config = {"model_type": "vit", "architectures": ["ViTForImageClassification"], "image_size": 32,
              "num_channels": 3, "hidden_size": 8, "num_hidden_layers": 1, "id2label": {"0": "a", "1": "b", "2": "c"}}
    r = client.put("/v1/models", params={"format": "hf"}, content=builders.tar_gz_bytes(builders.hf_files(config)))
    assert r.status_code == 201, r.text
    assert r.json()["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    assert r.json()["outputs"][0]["shape"] == ["batch", 3]


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        ({**builders.hf_files(), "pytorch_model.bin": b"\x80\x04pickle"}, "pickle"),
        ({"model.safetensors": builders.safetensors_bytes({"w": ("F32", [2])})}, "config.json"),
        ({"config.json": b"{}"}, "safetensors"),
        ({"config.json": b"[1]", "m.safetensors": builders.safetensors_bytes({"w": ("F32", [2])})}, "JSON object"),
        ({"config.json": b"{}", "m.safetensors": b"\xff" * 8 + b"{}"}, "header length"),
        ({**builders.hf_files(), "../evil.txt": b"x"}, ".."),
    ],
)
def test_hf_archive_rejections(client: TestClient, storage_dir: Path, files: dict[str, bytes], needle: str) -> None:
    r = client.put("/v1/models", params={"format": "hf"}, content=builders.zip_bytes(files))
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_model" and needle in r.json()["detail"]
    assert _model_rows() == 0 and blobs(storage_dir) == []


def test_hf_archive_with_symlink_rejected(client: TestClient) -> None:
    data = builders.tar_gz_bytes(builders.hf_files(), symlinks={"link.safetensors": "/etc/passwd"})
    r = client.put("/v1/models", params={"format": "hf"}, content=data)
    assert r.status_code == 422 and "links are not allowed" in r.json()["detail"]


def test_list_and_get(client: TestClient) -> None:
    ids = []
    for i in range(3):
        r = client.put("/v1/models", params={"name": f"m{i}", "format": "onnx"}, content=builders.onnx_bytes(seed=i))
        ids.append(r.json()["id"])
    page = client.get("/v1/models", params={"limit": 2}).json()
    assert [m["id"] for m in page["data"]] == [ids[2], ids[1]] and page["next_cursor"] == ids[1]
    rest = client.get("/v1/models", params={"limit": 2, "after": page["next_cursor"]}).json()
    assert [m["id"] for m in rest["data"]] == [ids[0]] and rest["next_cursor"] is None
    by_sha = client.get("/v1/models", params={"sha256": page["data"][0]["sha256"]}).json()["data"]
    assert [m["id"] for m in by_sha] == [ids[2]]
    assert client.get("/v1/models", params={"sha256": "0" * 64}).json()["data"] == []
    missing = client.get("/v1/models/mdl_nope")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


def test_multipart_file_first_in_tiny_chunks(client: TestClient) -> None:
    """curl -F file=@m.onnx -F name=... puts the file first; boundaries may straddle network chunks."""
    data = builders.onnx_bytes(in_features=5)
    boundary = "----modelpressTestBoundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.onnx"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + (
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nfile-first'
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="format"\r\n\r\nonnx\r\n--{boundary}--\r\n'
    ).encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 7):
            yield body[i : i + 7]

    r = client.post("/v1/models", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "file-first" and r.json()["size_bytes"] == len(data)
    assert r.json()["sha256"] == hashlib.sha256(data).hexdigest()


def test_client_disconnect_mid_upload_leaves_nothing(pg_env: str, storage_dir: Path) -> None:
    """A body that stops half-way (client gone): no temp file, no blob, no row, no 500."""
    import anyio

    from api.main import create_app

    app = create_app()
    sent: list[dict[str, object]] = []

    async def run() -> None:
        messages = [
            {"type": "http.request", "body": b"x" * 1000, "more_body": True},
            {"type": "http.disconnect"},
        ]

        async def receive() -> dict[str, object]:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "PUT", "scheme": "http", "path": "/v1/models", "raw_path": b"/v1/models",
                 "query_string": b"format=onnx", "root_path": "", "headers": [(b"host", b"test")],
                 "client": ("127.0.0.1", 1), "server": ("test", 80)}
        await app(scope, receive, send)

    anyio.run(run)
    assert sent[0]["status"] == 400
    assert _model_rows() == 0 and temp_files(storage_dir) == [] and blobs(storage_dir) == []


def test_nul_in_a_name_is_422_before_any_byte_is_stored(client: TestClient, storage_dir: Path) -> None:
    # PostgreSQL text cannot hold NUL: unchecked, the insert raised DataError (a 500) and orphaned the blob.
    r = client.put("/v1/models", params={"name": "a\x00b", "format": "onnx"}, content=builders.onnx_bytes())
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "name"
    assert _model_rows() == 0 and blobs(storage_dir) == [] and temp_files(storage_dir) == []


@pytest.mark.parametrize(
    "url", ["/v1/models/mdl_%00", "/v1/jobs/job_%00", "/v1/artifacts/art_%00", "/v1/models?after=a%00"]
)
def test_nul_in_an_id_or_cursor_is_not_a_500(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert r.status_code in (404, 422), r.text
    assert r.headers["content-type"].startswith("application/problem+json")


def test_a_rejected_upload_never_deletes_bytes_a_concurrent_upload_is_recording(
    pg_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same bytes, two uploads at once: one valid (slow to inspect), one declared with the wrong format.
    The rejected one must not delete the blob the valid one's row is about to point at (it never commits)."""
    import asyncio
    import time

    import httpx

    from api import inspection
    from api.main import create_app
    from models.settings import get_settings

    slow = inspection.MODEL_INSPECTORS["onnx"]

    def slow_onnx(path: Path) -> dict:
        time.sleep(0.6)  # the valid upload is still inspecting when the bad one finishes streaming
        return slow(path)

    monkeypatch.setitem(inspection.MODEL_INSPECTORS, "onnx", slow_onnx)
    data = builders.onnx_bytes(in_features=7)
    app = create_app()

    async def both() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            good = asyncio.create_task(c.put("/v1/models", params={"format": "onnx"}, content=data))
            await asyncio.sleep(0.2)
            bad = asyncio.create_task(c.put("/v1/models", params={"format": "hf"}, content=data))
            return await good, await bad

    good, bad = asyncio.run(both())
    # The second one either finds the valid one's row (same bytes, same owner: 200) or fails hf inspection.
    assert good.status_code == 201 and bad.status_code in (200, 422), (good.text, bad.text)
    key = good.json()["sha256"]
    from storage import get_store

    assert get_store().exists(key), "the recorded model's bytes were deleted by the rejected upload"
    assert [p.name for p in blobs(get_settings().blob_dir)] == [key]


def test_concurrent_uploads_of_the_same_bytes_are_settled_by_the_unique_constraint(
    pg_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both uploads pass the dedup look-up and inspect at once (no lock serialises them); the database's
    (owner, sha256) constraint lets one insert, and the other answers with that row."""
    import asyncio
    import threading
    import time

    import httpx

    from api import inspection
    from api.main import create_app
    from models.settings import get_settings

    real = inspection.MODEL_INSPECTORS["onnx"]
    inspected: list[str] = []
    both_inspecting = threading.Barrier(2, timeout=10)

    def slow_onnx(path: Path) -> dict:
        inspected.append(path.name)
        both_inspecting.wait()  # neither has inserted its row yet
        time.sleep(0.05)
        return real(path)

    monkeypatch.setitem(inspection.MODEL_INSPECTORS, "onnx", slow_onnx)
    data = builders.onnx_bytes(in_features=9)
    app = create_app()

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return list(await asyncio.gather(
                *(c.put("/v1/models", params={"format": "onnx", "name": n}, content=data) for n in ("a", "b"))
            ))

    first, second = asyncio.run(both())
    assert sorted((first.status_code, second.status_code)) == [200, 201], (first.text, second.text)
    assert first.json()["id"] == second.json()["id"] and len(inspected) == 2
    assert _model_rows() == 1
    root = get_settings().blob_dir
    assert [p.name for p in blobs(root)] == [hashlib.sha256(data).hexdigest()] and temp_files(root) == []


def test_onnx_archive_with_external_data_is_accepted(client: TestClient, tmp_path: Path) -> None:
    from tests import factories_onnx

    src = factories_onnx.opset20_cnn(tmp_path / "src")
    packed = factories_onnx.archive_of(src, tmp_path / "cnn.zip", "zip")
    r = client.put("/v1/models", params={"name": "cnn", "format": "onnx"}, content=packed.read_bytes())
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["meta"]["archive"] == "zip" and body["meta"]["external_data"] == ["model.onnx.data"]
    assert body["inputs"][0]["shape"] == ["batch", 1, 8, 8] and body["meta"]["opset"] == 20


def test_onnx_archive_with_a_link_is_422_and_leaves_nothing(
    client: TestClient, storage_dir: Path, tmp_path: Path
) -> None:
    from tests import factories_onnx

    src = factories_onnx.opset20_cnn(tmp_path / "src")
    packed = factories_onnx.tar_with_link(tmp_path / "evil.tar.gz", src, "../../modelpress.db")
    r = client.put("/v1/models", params={"format": "onnx"}, content=packed.read_bytes())
    assert r.status_code == 422 and r.json()["code"] == "invalid_model", r.text
    assert "links are not allowed" in r.json()["detail"]
    assert _model_rows() == 0 and blobs(storage_dir) == [] and temp_files(storage_dir) == []


def _torch_saved(tmp_path: Path, zipped: bool) -> bytes:
    import torch

    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2, 2)}, path, _use_new_zipfile_serialization=zipped)
    return path.read_bytes()


@pytest.mark.parametrize("fmt", ["onnx", "hf"])
@pytest.mark.parametrize("zipped", [True, False], ids=["torch-save-zip", "legacy-pickle"])
def test_a_torch_save_file_says_pickles_are_refused_and_how_to_export(
    client: TestClient, storage_dir: Path, tmp_path: Path, fmt: str, zipped: bool
) -> None:
    r = client.put("/v1/models", params={"name": "m.pt", "format": fmt}, content=_torch_saved(tmp_path, zipped))
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    detail = r.json()["detail"]
    assert "PyTorch pickle" in detail and "refused" in detail
    assert "torch.onnx.export" in detail and "safetensors" in detail and "format hf" in detail
    assert _model_rows() == 0 and blobs(storage_dir) == []


def test_a_hugging_face_folder_uploaded_as_onnx_is_told_to_use_hf(client: TestClient, storage_dir: Path) -> None:
    r = client.put("/v1/models", params={"format": "onnx"}, content=builders.zip_bytes(builders.hf_files()))
    assert r.status_code == 422
    assert "this looks like a Hugging Face model" in r.json()["detail"] and "use format hf" in r.json()["detail"]
    onnx_zip = builders.zip_bytes({"model.onnx": builders.onnx_bytes()})
    r = client.put("/v1/models", params={"format": "hf"}, content=onnx_zip)
    assert r.status_code == 422 and "use format onnx" in r.json()["detail"]
    assert _model_rows() == 0 and blobs(storage_dir) == []


def test_the_same_bytes_as_another_format_are_a_409_naming_both(client: TestClient) -> None:
    both = builders.zip_bytes({**builders.hf_files(), "model.onnx": builders.onnx_bytes()})  # valid as either
    first = client.put("/v1/models", params={"name": "a", "format": "onnx"}, content=both)
    assert first.status_code == 201, first.text
    again = client.put("/v1/models", params={"name": "b", "format": "hf"}, content=both)
    assert again.status_code == 409 and again.headers["content-type"].startswith("application/problem+json")
    body = again.json()
    assert body["code"] == "format_conflict" and first.json()["id"] in body["detail"]
    assert "'onnx'" in body["detail"] and "'hf'" in body["detail"]
    same = client.put("/v1/models", params={"name": "c", "format": "onnx"}, content=both)
    assert same.status_code == 200 and same.json()["id"] == first.json()["id"]  # same format: deduplicated
    assert _model_rows() == 1
