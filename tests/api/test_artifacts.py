"""Artifact metadata and downloads: ETag, 304, single ranges (206), 416, Content-Disposition."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.api import builders

DATA = bytes(range(256)) * 40  # 10240 bytes


def _artifact(name: str = "model.onnx") -> str:
    job_id = builders.insert_job(builders.insert_model(), status="succeeded")
    return builders.insert_artifact(job_id, DATA, name=name)


def test_metadata(client: TestClient) -> None:
    art = _artifact()
    body = client.get(f"/v1/artifacts/{art}").json()
    assert body["sha256"] == hashlib.sha256(DATA).hexdigest() and body["size_bytes"] == len(DATA)
    assert body["url"] == f"/v1/artifacts/{art}/content" and body["name"] == "model.onnx"
    missing = client.get("/v1/artifacts/art_nope")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


def test_download_etag_and_304(client: TestClient) -> None:
    art = _artifact()
    r = client.get(f"/v1/artifacts/{art}/content")
    assert r.status_code == 200 and r.content == DATA
    etag = r.headers["etag"]
    assert etag == f'"{hashlib.sha256(DATA).hexdigest()}"'
    assert r.headers["accept-ranges"] == "bytes" and r.headers["content-length"] == str(len(DATA))
    assert r.headers["content-disposition"] == "attachment; filename=model.onnx"
    cached = client.get(f"/v1/artifacts/{art}/content", headers={"If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b"" and cached.headers["etag"] == etag
    stale = client.get(f"/v1/artifacts/{art}/content", headers={"If-None-Match": '"other"'})
    assert stale.status_code == 200 and stale.content == DATA


def test_ranges(client: TestClient) -> None:
    art = _artifact()
    url = f"/v1/artifacts/{art}/content"
    r = client.get(url, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == DATA[100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{len(DATA)}" and r.headers["content-length"] == "100"
    r = client.get(url, headers={"Range": "bytes=10000-"})
    assert r.status_code == 206 and r.content == DATA[10000:]
    r = client.get(url, headers={"Range": "bytes=-16"})
    assert r.status_code == 206 and r.content == DATA[-16:]
    r = client.get(url, headers={"Range": "bytes=10200-99999"})
    assert r.status_code == 206 and r.content == DATA[10200:]
    r = client.get(url, headers={"Range": f"bytes={len(DATA)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(DATA)}"
    assert r.json()["code"] == "range_not_satisfiable"
    r = client.get(url, headers={"Range": "bytes=0-1,5-6"})  # several ranges: served whole
    assert r.status_code == 200 and r.content == DATA
    r = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert r.status_code == 200 and len(r.content) == len(DATA)


def test_odd_names_are_quoted(client: TestClient) -> None:
    art = _artifact(name='répört "v1".json')
    r = client.get(f"/v1/artifacts/{art}/content")
    disposition = r.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="r_p_rt _v1_.json"')
    assert "filename*=UTF-8''r%C3%A9p%C3%B6rt%20%22v1%22.json" in disposition


def test_download_holds_no_db_connection_while_streaming(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    # A multi-GB artifact to a slow client must not pin a pooled connection ("idle in transaction")
    # for the whole transfer: the request's session has to be closed before the body streams.
    from api.services import artifacts as service
    from models.db import get_engine

    art = _artifact()
    seen: list[int] = []
    real = service.read_blob

    def spying(key: str, start: int, length: int) -> Iterator[bytes]:
        for chunk in real(key, start, length):
            seen.append(get_engine().pool.checkedout())  # type: ignore[attr-defined]
            yield chunk

    monkeypatch.setattr(service, "read_blob", spying)
    r = client.get(f"/v1/artifacts/{art}/content")
    assert r.status_code == 200 and r.content == DATA
    assert seen and max(seen) == 0, seen


@pytest.mark.parametrize("value", ["bytes=" + "9" * 5000 + "-", "bytes=0-" + "9" * 5000, "bytes=-" + "9" * 5000,
                                   "bytes=99999999999999999999-", "bytes=0-9223372036854775808"])
def test_huge_range_numbers_are_416_not_500(client: TestClient, value: str) -> None:
    r = client.get(f"/v1/artifacts/{_artifact()}/content", headers={"Range": value})
    assert r.status_code == 416, r.text[:300]
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "range_not_satisfiable"


def test_head_answers_what_get_would_without_the_bytes(client: TestClient) -> None:
    art = _artifact()
    url = f"/v1/artifacts/{art}/content"
    got = client.get(url)
    head = client.head(url)
    assert head.status_code == 200 and head.content == b""
    for name in ("etag", "content-length", "content-type", "content-disposition", "accept-ranges"):
        assert head.headers[name] == got.headers[name], name
    assert head.headers["content-length"] == str(len(DATA))
    part = client.head(url, headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.headers["content-length"] == "10" and part.content == b""
    assert client.head(url, headers={"If-None-Match": got.headers["etag"]}).status_code == 304
    assert client.head(url, headers={"Range": f"bytes={len(DATA)}-"}).status_code == 416
    assert client.head("/v1/artifacts/art_missing/content").status_code == 404
