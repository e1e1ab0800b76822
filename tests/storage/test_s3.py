"""The S3 backend against a real SeaweedFS server: layout, multipart with bounded buffers, aborts, cache, faults.

The interface contract itself (put, ranges, limits, missing blobs, delete) runs against S3 in
tests/storage/test_base.py; these are what only a remote store has."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import pytest

from storage.base import BlobNotFound, StorageUnavailable
from storage.s3 import MIB, S3BlobStore, make_client
from tests.storage.faults import proxy
from tests.storage.seaweed import ACCESS_KEY, SECRET_KEY, Weed


def client_for(endpoint: str, attempts: int = 2) -> Any:
    return make_client(endpoint, connect_timeout=2, read_timeout=10, max_attempts=attempts,
                       access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)


def new_store(weed: object, tmp_path: Path, endpoint: str | None = None, bucket: str | None = None,
              **kw: Any) -> S3BlobStore:
    """An S3BlobStore on the test server (or on ``endpoint``, a proxy in front of it), in a new bucket."""
    assert isinstance(weed, Weed)
    client = client_for(endpoint or weed.endpoint)
    kw.setdefault("retry_delay_s", 0.05)
    return S3BlobStore(bucket or f"t-{uuid.uuid4().hex[:12]}", "pre/fix", client=client,
                       staging_dir=tmp_path / "staging", cache_dir=tmp_path / "cache", **kw)


def _objects(store: S3BlobStore) -> list[str]:
    out = client_for(getattr(store.client.meta, "endpoint_url", "")).list_objects_v2(Bucket=store.bucket)
    return sorted(o["Key"] for o in out.get("Contents", []))


def test_blobs_are_content_addressed_under_the_prefix_and_the_bucket_is_created(
    s3_server: Weed, tmp_path: Path
) -> None:
    store = new_store(s3_server, tmp_path)
    a = store.put([b"weights" * 100])
    assert store.put([b"weights" * 50, b"weights" * 50]) == a
    key = a.key
    assert _objects(store) == [f"pre/fix/{key[:2]}/{key[2:4]}/{key}"]
    assert list(store.staging_dir.iterdir()) == []


def test_a_large_upload_goes_in_parts_with_bounded_memory(s3_server: Weed, tmp_path: Path) -> None:
    store = new_store(s3_server, tmp_path, part_bytes=5 * MIB, upload_parallel=2)
    data = os.urandom(31 * MIB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    del data
    tracemalloc.start()
    try:
        blob = store.put_file(src)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert blob.size_bytes == 31 * MIB
    # Two 5 MiB parts in flight (and what sending one copies), never the 31 MiB file.
    assert peak < 4 * 5 * MIB, peak / MIB
    head = store.client.head_object(Bucket=store.bucket, Key=store.object_key(blob.key))
    assert head["ContentLength"] == 31 * MIB and head["ETag"].strip('"').endswith("-7")  # seven parts
    got = hashlib.sha256()
    for chunk in store.iter_chunks(blob.key):
        got.update(chunk)
    assert got.hexdigest() == blob.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()


def test_a_failed_part_aborts_the_multipart_upload(s3_server: Weed, tmp_path: Path) -> None:
    from botocore.exceptions import EndpointConnectionError

    store = new_store(s3_server, tmp_path, part_bytes=5 * MIB)
    store.put([b"the bucket exists"])
    parts: list[int] = []

    def fail_third_part(**kw: Any) -> None:  # the network fails while the third part is sent
        parts.append(len(parts) + 1)
        if len(parts) == 3:
            raise EndpointConnectionError(endpoint_url="s3")

    store.client.meta.events.register("before-call.s3.UploadPart", fail_third_part)
    with pytest.raises(StorageUnavailable, match="unavailable during an upload"):
        store.put([os.urandom(MIB) for _ in range(16)])
    assert parts[:3] == [1, 2, 3]
    assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []
    assert len(_objects(store)) == 1 and list(store.staging_dir.iterdir()) == []


def test_unfinished_uploads_left_behind_are_swept(s3_server: Weed, tmp_path: Path) -> None:
    store = new_store(s3_server, tmp_path)
    store.ensure_bucket()
    left = store.client.create_multipart_upload(Bucket=store.bucket, Key=store.object_key("a" * 64))["UploadId"]
    elsewhere = store.client.create_multipart_upload(Bucket=store.bucket, Key="not-ours/x")["UploadId"]
    store.client.upload_part(Bucket=store.bucket, Key=store.object_key("a" * 64), UploadId=left, PartNumber=1,
                             Body=b"orphan")
    store.put([b"first commit"])  # sweeps once, leaving recent uploads alone
    assert store.abort_stale_uploads() == 0
    assert store.abort_stale_uploads(older_than_s=0) == 1  # only those under the prefix
    remaining = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    assert [u["UploadId"] for u in remaining] == [elsewhere]


def test_s3_unreachable_mid_upload_leaves_no_object(s3_server: Weed, tmp_path: Path) -> None:
    with proxy(s3_server.endpoint) as p:
        store = new_store(s3_server, tmp_path, endpoint=p.endpoint, part_bytes=5 * MIB)
        store.put([b"the bucket exists"])
        p.die_after_request_bytes = p.request_bytes + 8 * MIB  # gone in the middle of the second part
        data = os.urandom(12 * MIB)
        with pytest.raises(StorageUnavailable, match=f"S3 bucket '{store.bucket}' unavailable during an upload"):
            store.put([data])
    direct = new_store(s3_server, tmp_path / "direct", bucket=store.bucket)
    assert not direct.exists(hashlib.sha256(data).hexdigest())
    assert list(store.staging_dir.iterdir()) == []
    # The abort could not reach S3 either: the unfinished upload waits for a later process's sweep.
    assert direct.abort_stale_uploads(older_than_s=0) == 1


def test_the_cache_is_bounded_least_recently_used_and_links_survive_eviction(
    s3_server: Weed, tmp_path: Path
) -> None:
    store = new_store(s3_server, tmp_path, cache_bytes=2500)
    gets: list[str] = []
    store.client.meta.events.register("after-call.s3.GetObject", lambda **kw: gets.append("get"))
    a, b, c = (store.put([bytes([i]) * 1000]) for i in range(3))
    pa = store.local_copy(a.key, tmp_path / "job1")
    pb = store.local_copy(b.key, tmp_path / "job1")
    assert pa.read_bytes() == b"\x00" * 1000 and pb.read_bytes() == b"\x01" * 1000 and len(gets) == 2
    os.utime(store.cache.path(b.key), (1, 1))  # b was used long ago
    assert store.local_copy(a.key, tmp_path / "job2").read_bytes() == b"\x00" * 1000
    assert len(gets) == 2  # a hit: no download
    store.local_copy(c.key, tmp_path / "job2")
    assert len(gets) == 3
    cached = sorted(p.name for _, _, p in store.cache.entries())
    assert cached == sorted([a.key, c.key]) and store.cache.total_bytes() <= 2500
    assert pb.read_bytes() == b"\x01" * 1000  # job1's link outlives the evicted entry
    # A blob bigger than the whole cache goes to the caller only.
    big = store.put([b"x" * 3000])
    assert store.local_copy(big.key, tmp_path / "job3").read_bytes() == b"x" * 3000
    assert store.cache.get(big.key) is None and store.cache.total_bytes() <= 2500
    with pytest.raises(BlobNotFound):
        store.local_copy("0" * 64, tmp_path / "job3")


def test_a_download_that_breaks_off_is_retried_and_never_cached_partly(s3_server: Weed, tmp_path: Path) -> None:
    data = os.urandom(3 * MIB)
    with proxy(s3_server.endpoint) as p:
        store = new_store(s3_server, tmp_path, endpoint=p.endpoint)
        blob = store.put([data])
        p.after_bytes, p.break_responses = MIB, 1  # the next connection breaks off after 1 MiB
        store.client.close()  # new connections from here on
        path = store.local_copy(blob.key, tmp_path / "job")
        assert p.broken == 1 and path.read_bytes() == data
        assert store.cache.get(blob.key) is not None

        other = store.put([data[::-1]])
        p.break_responses = 100  # every try breaks off: give up, keep nothing
        store.client.close()
        with pytest.raises(StorageUnavailable, match=r"could not be downloaded .* in 3 attempts"):
            store.local_copy(other.key, tmp_path / "job")
        assert store.cache.get(other.key) is None and list(store.cache.tmp.iterdir()) == []
        assert not (tmp_path / "job" / other.key).exists()


def test_a_short_object_under_a_key_is_replaced_and_never_cached(s3_server: Weed, tmp_path: Path) -> None:
    """What a server keeps of a PUT cut short (SeaweedFS: an empty object) is neither deduplicated against nor read."""
    store = new_store(s3_server, tmp_path)
    store.ensure_bucket()
    data = b"the real bytes" * 1000
    key = hashlib.sha256(data).hexdigest()
    store.client.put_object(Bucket=store.bucket, Key=store.object_key(key), Body=b"")
    with pytest.raises(StorageUnavailable, match=r"could not be downloaded .* hash to"):
        store.local_copy(key, tmp_path / "job")
    assert store.cache.get(key) is None and not (tmp_path / "job" / key).exists()
    assert store.put([data]).size_bytes == len(data)  # the commit sees the wrong size and uploads again
    assert store.size(key) == len(data) and store.local_copy(key, tmp_path / "job").read_bytes() == data


def test_check_and_reads_when_s3_is_down(s3_server: Weed, tmp_path: Path) -> None:
    store = new_store(s3_server, tmp_path)
    store.check()  # creates the bucket
    assert store.client.head_bucket(Bucket=store.bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200
    with proxy(s3_server.endpoint) as p:
        dead = p.endpoint
    down = new_store(s3_server, tmp_path / "down", endpoint=dead)
    for call in (down.check, lambda: down.size("0" * 64), lambda: down.put([b"x"])):
        with pytest.raises(StorageUnavailable, match=r"S3 bucket .* unavailable"):
            call()
    assert list(down.staging_dir.iterdir()) == []
