"""Upload, worker hand-off and download through a store that has no local paths (the in-memory double).

If any API or worker code path reached for a local blob path, these would fail: the memory store has
none, and the local storage folder must stay empty."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
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
    from worker import records

    data = builders.onnx_bytes(in_features=5)
    r = mem_client.put("/v1/models", params={"name": "m", "format": "onnx"}, content=data)
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["inputs"][0]["shape"] == ["batch", 5]  # inspected from the staged file
    assert store.blobs == {model["sha256"]: data}
    assert mem_client.put("/v1/models", params={"format": "onnx"}, content=data).status_code == 200

    # The worker gets its inputs as local copies and stores its outputs through the interface.
    spec = JobSpec.model_validate({"model": model["id"], "steps": [{"type": "quantize", "mode": "dynamic"}]})
    refs = records.model_refs(spec, tmp_path / "inputs")
    path, fmt, _meta = refs[model["id"]]
    assert fmt == "onnx" and path.read_bytes() == data and store.copies == [path]
    job_id = builders.insert_job(model["id"], status="succeeded")
    out = tmp_path / "out.onnx"
    out.write_bytes(bytes(range(256)) * 8)
    (art_id,) = records.store_artifacts(records.Claim(job_id, 1), "local", {"model.onnx": ("model", out)})

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


# -- the same through the real S3 backend (SeaweedFS) ---------------------------------------------


@pytest.fixture
def s3_client(pg_env: str, s3_env: str) -> Iterator[TestClient]:
    from api.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as c:
        yield c


def _bucket_objects(url: str) -> list[str]:
    from storage import get_store
    from storage.s3 import S3BlobStore

    store = get_store()
    assert isinstance(store, S3BlobStore) and store.where == url.rstrip("/")
    out = store.client.list_objects_v2(Bucket=store.bucket)
    return sorted(o["Key"] for o in out.get("Contents", []))


def test_upload_worker_inputs_and_download_on_s3(s3_client: TestClient, s3_env: str, tmp_path: Path) -> None:
    from models.settings import get_settings
    from models.spec import JobSpec
    from storage import get_store
    from storage.s3 import S3BlobStore
    from worker import records

    data = builders.onnx_bytes(in_features=5)
    r = s3_client.put("/v1/models", params={"name": "m", "format": "onnx"}, content=iter([data[:100], data[100:]]))
    assert r.status_code == 201, r.text
    model = r.json()
    key = model["sha256"]
    assert model["inputs"][0]["shape"] == ["batch", 5]
    assert _bucket_objects(s3_env) == [f"blobs/{key[:2]}/{key[2:4]}/{key}"]
    assert s3_client.get("/readyz").json()["checks"]["storage"] == "ok"

    spec = JobSpec.model_validate({"model": model["id"], "steps": [{"type": "quantize", "mode": "dynamic"}]})
    path, fmt, _ = records.model_refs(spec, tmp_path / "inputs")[model["id"]]
    store = get_store()
    assert isinstance(store, S3BlobStore)
    assert fmt == "onnx" and path.read_bytes() == data and path.parent == tmp_path / "inputs"
    assert store.cache.get(key) is not None  # the worker's cache keeps it for the next job

    job_id = builders.insert_job(model["id"], status="succeeded")
    out = tmp_path / "out.onnx"
    out.write_bytes(bytes(range(256)) * 8)
    (art_id,) = records.store_artifacts(records.Claim(job_id, 1), "local", {"model.onnx": ("model", out)})
    url = f"/v1/artifacts/{art_id}/content"
    whole = s3_client.get(url)
    assert whole.status_code == 200 and whole.content == out.read_bytes()
    part = s3_client.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == out.read_bytes()[10:20]
    local_root = get_settings().blob_dir
    assert blobs(local_root) == [] and temp_files(local_root) == []


def test_s3_unreachable_during_an_upload_is_503_and_records_nothing(
    s3_client: TestClient, s3_env: str, s3_server: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import func, select

    from models.db import session_scope
    from models.settings import get_settings
    from models.tables import Dataset
    from storage import backends, get_store
    from tests.storage.faults import proxy
    from tests.storage.seaweed import Weed

    assert isinstance(s3_server, Weed)
    body = builders.npz_bytes({"x": np.random.default_rng(0).random((200, 64), dtype=np.float32)})
    with proxy(s3_server.endpoint) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
        monkeypatch.setattr(backends, "_STORES", {})
        get_store().check()  # the bucket exists
        art = builders.insert_artifact(builders.insert_job(builders.insert_model(), status="succeeded"), b"kept")
        p.die_after_request_bytes = p.request_bytes + len(body) // 2  # S3 goes away mid-upload
        r = s3_client.put("/v1/datasets", params={"name": "d", "format": "npz"}, content=body)
        assert r.status_code == 503, r.text
        problem = r.json()
        assert problem["code"] == "storage_unavailable" and "unavailable during" in problem["detail"]
        assert r.headers["content-type"].startswith("application/problem+json") and r.headers["retry-after"]
        ready = s3_client.get("/readyz")
        assert ready.status_code == 503 and "storage" in ready.json()["detail"]
        down = s3_client.get(f"/v1/artifacts/{art}/content")  # a download while S3 is away: 503, not a 500 or a 404
        assert down.status_code == 503 and down.json()["code"] == "storage_unavailable"
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Dataset)) == 0
    monkeypatch.setattr(backends, "_STORES", {})
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    assert _bucket_objects(s3_env) == [f"blobs/{k[:2]}/{k[2:4]}/{k}" for k in [hashlib.sha256(b"kept").hexdigest()]]
    assert temp_files(get_settings().home) == []  # the S3 store stages uploads under $HOME/tmp


@pytest.fixture
def presigning(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The S3 store with presigned downloads on (60 s)."""
    from models.settings import get_settings
    from storage import backends

    monkeypatch.setenv("MODELPRESS_S3_PRESIGN_S", "60")
    monkeypatch.setattr(backends, "_STORES", {})
    get_settings.cache_clear()
    yield s3_env
    get_settings.cache_clear()


def test_a_presigned_download_redirects_to_s3_with_the_name_type_and_ranges(
    pg_env: str, presigning: str, s3_server: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    from api.main import create_app
    from models.settings import get_settings
    from storage import backends
    from tests.storage.seaweed import Weed

    assert isinstance(s3_server, Weed)
    data = bytes(range(256)) * 64
    job = builders.insert_job(builders.insert_model(), status="succeeded")
    art = builders.insert_artifact(job, data, name="résumé model.onnx")
    theirs = builders.insert_artifact(builders.insert_job(builders.insert_model(owner="bob"), status="succeeded",
                                                          owner="bob"), b"bob's", owner="bob")
    with TestClient(create_app(), raise_server_exceptions=False) as api:
        r = api.get(f"/v1/artifacts/{art}/content", follow_redirects=False)
        assert r.status_code == 307, r.text
        where = r.headers["location"]
        assert where.startswith(s3_server.endpoint + "/") and "X-Amz-Signature=" in where
        assert r.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
        assert api.get(f"/v1/artifacts/{theirs}/content", follow_redirects=False).status_code == 404
        assert api.head(f"/v1/artifacts/{art}/content").headers["content-length"] == str(len(data))  # no redirect
        assert api.get(f"/v1/artifacts/{art}/content", headers={"If-None-Match": r.headers["etag"]},
                       follow_redirects=False).status_code == 304
    whole = httpx.get(where)  # no Authorization: the URL itself is the grant
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["content-disposition"] == "attachment; filename=\"r_sum_ model.onnx\"; " \
                                                   "filename*=UTF-8''r%C3%A9sum%C3%A9%20model.onnx"
    part = httpx.get(where, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert httpx.get(where.replace("X-Amz-Signature=", "X-Amz-Signature=0")).status_code == 403  # tampered
    from storage import get_store

    brief = get_store().download_url(hashlib.sha256(data).hexdigest(), disposition="attachment",
                                      media_type="application/octet-stream", expires_s=3)
    # X-Amz-Date is whole seconds: a URL signed at 10.9 s for 1 s is dead at 11.0 (CI saw a 403 at once), so 3 s
    # leaves at least 2 s to use it, and 3.2 s after that first use it has expired whatever the rounding
    assert brief is not None and httpx.get(brief).status_code == 200
    time.sleep(3.2)
    assert httpx.get(brief).status_code == 403  # expired

    # Signed for the address clients use, when it is not the API's own.
    public = s3_server.endpoint.replace("127.0.0.1", "localhost")
    monkeypatch.setenv("MODELPRESS_S3_PRESIGN_ENDPOINT", public)
    monkeypatch.setattr(backends, "_STORES", {})
    get_settings.cache_clear()
    with TestClient(create_app(), raise_server_exceptions=False) as api:
        there = api.get(f"/v1/artifacts/{art}/content", follow_redirects=False).headers["location"]
    assert there.startswith(public + "/")
    assert httpx.get(there).content == data


def test_the_sdk_follows_a_presigned_download_and_verifies_it(
    pg_env: str, presigning: str, tmp_path: Path
) -> None:
    from api.main import create_app
    from client import Client
    from tests.e2e.harness import serve_in_thread

    data = b"weights" * 5000
    job = builders.insert_job(builders.insert_model(), status="succeeded")
    builders.insert_artifact(job, data, name="model.onnx")
    with serve_in_thread(create_app()) as url, Client(url) as mp:
        (path,) = mp.job(job).download(tmp_path / "out")
    assert path.read_bytes() == data
