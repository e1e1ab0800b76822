"""Upload, worker hand-off and download through a store that has no local paths (the in-memory double).

If any API or worker code path reached for a local blob path, these would fail: the memory store has
none, and the local storage folder must stay empty."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.api import builders
from tests.api.conftest import blobs, temp_files
from tests.storage import memory


@pytest.fixture
def store(pg_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[memory.MemoryBlobStore]:
    from models.settings import get_settings

    yield memory.install(monkeypatch, tmp_path / "staging")
    get_settings.cache_clear()


@pytest.fixture
def mem_client(store: memory.MemoryBlobStore) -> Iterator[TestClient]:
    from api.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as c:
        yield c


def test_upload_job_inputs_artifact_and_ranged_download(
    mem_client: TestClient, store: memory.MemoryBlobStore, tmp_path: Path
) -> None:
    from models.settings import get_settings
    from models.spec import JobSpec
    from worker import jobs

    data = builders.onnx_bytes(in_features=5)
    r = mem_client.put("/v1/models", params={"name": "m", "format": "onnx"}, content=data)
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["inputs"][0]["shape"] == ["batch", 5]  # inspected from the staged file
    assert store.blobs == {model["sha256"]: data}
    assert mem_client.put("/v1/models", params={"format": "onnx"}, content=data).status_code == 200

    # The worker gets its inputs as local copies and stores its outputs through the interface.
    spec = JobSpec.model_validate({"model": model["id"], "steps": [{"type": "quantize", "mode": "dynamic"}]})
    refs = jobs._model_refs(spec, tmp_path / "inputs")
    path, fmt, _meta = refs[model["id"]]
    assert fmt == "onnx" and path.read_bytes() == data and store.copies == [path]
    job_id = builders.insert_job(model["id"], status="succeeded")
    out = tmp_path / "out.onnx"
    out.write_bytes(bytes(range(256)) * 8)
    (art_id,) = jobs._store_artifacts(jobs.Claim(job_id, 1), "local", {"model.onnx": ("model", out)})

    url = f"/v1/artifacts/{art_id}/content"
    whole = mem_client.get(url)
    assert whole.status_code == 200 and whole.content == out.read_bytes()
    assert whole.headers["etag"] == f'"{hashlib.sha256(out.read_bytes()).hexdigest()}"'
    part = mem_client.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == out.read_bytes()[10:20]
    assert part.headers["content-range"] == "bytes 10-19/2048"

    local_root = get_settings().blob_dir
    assert blobs(local_root) == [] and temp_files(local_root) == []
    assert list(store.staging_dir.iterdir()) == []


def test_rejected_and_oversized_uploads_store_nothing(
    mem_client: TestClient, store: memory.MemoryBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.settings import get_settings

    r = mem_client.put("/v1/datasets", params={"format": "npz"}, content=b"not an npz" * 100)
    assert r.status_code == 422 and r.json()["code"] == "invalid_dataset"
    monkeypatch.setenv("MODELPRESS_MAX_UPLOAD_BYTES", "100")
    get_settings.cache_clear()
    r = mem_client.put("/v1/models", params={"format": "onnx"}, content=iter([b"x" * 60, b"x" * 60]))
    assert r.status_code == 413 and r.json()["code"] == "upload_too_large"
    assert store.blobs == {} and list(store.staging_dir.iterdir()) == []


def test_an_artifact_whose_blob_is_gone_is_404(mem_client: TestClient, store: memory.MemoryBlobStore) -> None:
    art = builders.insert_artifact(builders.insert_job(builders.insert_model(), status="succeeded"), b"bytes")
    store.blobs.clear()
    r = mem_client.get(f"/v1/artifacts/{art}/content")
    assert r.status_code == 404 and "content is missing" in r.json()["detail"]
