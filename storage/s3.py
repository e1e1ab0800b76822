"""S3 blob store (boto3): ``MODELPRESS_STORAGE_URL=s3://bucket/prefix`` with the standard AWS_* variables.

boto3 rather than obstore: it is the reference S3 client, reads ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_REGION`` itself, retries throttling and
connection errors with backoff, and exposes the multipart calls one by one, so a part buffer is
bounded here and a failed upload is aborted explicitly. The API is synchronous like the rest of the
storage interface (uploads are committed in a thread already), so obstore's async API buys nothing.

Blobs are content-addressed like the local store's: ``<prefix>/ab/cd/<sha256>``. A commit re-reads
the staged file part by part (at most ``upload_parallel`` parts of ``part_bytes`` in memory, sent
concurrently) while hashing it again and completes
the multipart upload only when the hash matches; any failure aborts it, so no partial object and no
uploaded parts are left. Every request body carries its checksum (the object's sha256 on a single PUT,
each part's MD5): SeaweedFS, for one, keeps an empty object when a PUT without one is cut short, which
under a content address would be a corrupt blob that later uploads deduplicate against. A worker's ``local_copy`` goes through a bounded local cache (storage.cache),
filled atomically and verified against the key; an interrupted download is retried, then reported as
StorageUnavailable.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import urlsplit

from storage.base import (
    CHUNK,
    BlobNotFound,
    BlobStore,
    Staged,
    StorageConfigError,
    StorageUnavailable,
    StoredBlob,
    check_key,
)
from storage.cache import BlobCache, link_into

S3Client = Any  # a boto3 S3 client (no stubs installed)

log = logging.getLogger("modelpress.storage.s3")

MIB = 1024 * 1024
MIN_PART = 5 * MIB  # S3's smallest part (but the last)
DOWNLOAD_ATTEMPTS = 3
STALE_UPLOAD_S = 24 * 3600.0  # an unfinished multipart upload older than this was abandoned
_MISSING = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})


def _client_error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


class S3BlobStore(BlobStore):
    """Blobs in ``bucket`` under ``prefix``; uploads are staged locally (inspected first), then multipart-uploaded."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: S3Client | None = None,
        endpoint_url: str | None = None,
        staging_dir: Path | None = None,
        cache_dir: Path | None = None,
        cache_bytes: int = 10 * 1024**3,
        part_bytes: int = 8 * MIB,
        upload_parallel: int = 4,
        retry_delay_s: float = 0.5,
        presign_endpoint: str | None = None,
    ) -> None:
        super().__init__(staging_dir)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_bytes = part_bytes
        self.upload_parallel = upload_parallel
        self.retry_delay_s = retry_delay_s
        self.client: S3Client = client if client is not None else make_client(endpoint_url)
        # /readyz answers within seconds: its bucket check does not wait through the retries.
        self.check_client: S3Client = (
            client if client is not None else make_client(endpoint_url, connect_timeout=2, read_timeout=3, max_attempts=1)
        )
        self.cache = BlobCache(cache_dir if cache_dir is not None else self.staging_dir / "blob-cache", cache_bytes)
        # Presigned URLs are signed for the host clients use, which may not be the API's (a private name).
        self.presign_endpoint = presign_endpoint
        self._presign_client: S3Client | None = None
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()
        self._swept = False

    def __repr__(self) -> str:
        return f"S3BlobStore(s3://{self.bucket}/{self.prefix})"

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def object_key(self, key: str) -> str:
        check_key(key)
        rel = f"{key[:2]}/{key[2:4]}/{key}"
        return f"{self.prefix}/{rel}" if self.prefix else rel

    # -- errors ----------------------------------------------------------------------------------

    def _unavailable(self, what: str, exc: Exception) -> StorageUnavailable:
        code = _client_error_code(exc)
        reason = f"{type(exc).__name__}{f' {code}' if code else ''}"
        log.warning("S3 %s on %s failed: %s", what, self.where, exc)
        return StorageUnavailable(f"S3 bucket {self.bucket!r} unavailable during {what} ({reason})")

    @contextlib.contextmanager
    def _calls(self, what: str, key: str | None = None) -> Iterator[None]:
        """Map botocore errors: a missing object is BlobNotFound, anything else StorageUnavailable."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            if key is not None and _client_error_code(exc) in _MISSING:
                raise BlobNotFound(key) from None
            raise self._unavailable(what, exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable(what, exc) from exc

    def ensure_bucket(self, client: S3Client | None = None) -> None:
        """Create the bucket when it is missing (once per process)."""
        if self._bucket_ready:
            return
        from botocore.exceptions import ClientError

        client = client if client is not None else self.client
        with self._bucket_lock, self._calls("the bucket check"):
            try:
                client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _client_error_code(exc) not in _MISSING:
                    raise
                log.info("creating bucket %s", self.bucket)
                try:
                    client.create_bucket(Bucket=self.bucket)
                except ClientError as again:
                    if _client_error_code(again) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
            self._bucket_ready = True

    # -- the interface ---------------------------------------------------------------------------

    def commit(self, staged: Staged) -> StoredBlob:
        """Upload the staged file (one PUT when it fits a part, else multipart) unless the key exists."""
        check_key(staged.sha256)
        try:
            self.ensure_bucket()
            self._sweep_once()
            if self._stored_size(staged.sha256) != staged.size_bytes:  # absent (or, defensively, short)
                if staged.size_bytes <= self.part_bytes:
                    self._put_single(staged)
                else:
                    self._put_multipart(staged)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged.path)
        return StoredBlob(key=staged.sha256, sha256=staged.sha256, size_bytes=staged.size_bytes)

    def _stored_size(self, key: str) -> int | None:
        try:
            return self.size(key)
        except BlobNotFound:
            return None

    def _put_single(self, staged: Staged) -> None:
        """One PUT with the body's sha256: the server refuses a body cut short (rather than keep what came)."""
        data = staged.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != staged.sha256:
            raise StorageUnavailable(f"staged upload {staged.path.name} changed before it was stored")
        with self._calls("an upload"):
            self.client.put_object(Bucket=self.bucket, Key=self.object_key(staged.sha256), Body=data,
                                   ContentLength=len(data),
                                   ChecksumSHA256=base64.b64encode(bytes.fromhex(staged.sha256)).decode())

    def _put_multipart(self, staged: Staged) -> None:
        """Parts of ``part_bytes`` read (and hashed) in order, up to ``upload_parallel`` of them in flight.

        Memory is bounded by ``upload_parallel * part_bytes``; the first failed part stops the reading,
        waits for the parts in flight and aborts the upload."""
        key = self.object_key(staged.sha256)
        with self._calls("an upload"):
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]

        def send(number: int, data: bytes) -> dict[str, Any]:
            md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()  # refused when cut short
            with self._calls("an upload"):
                etag = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                               PartNumber=number, Body=data, ContentMD5=md5)["ETag"]
            return {"ETag": etag, "PartNumber": number}

        pool = ThreadPoolExecutor(max(1, self.upload_parallel), thread_name_prefix="s3-part")
        in_flight: collections.deque[Future[dict[str, Any]]] = collections.deque()
        try:
            parts: list[dict[str, Any]] = []
            h = hashlib.sha256()
            with open(staged.path, "rb") as fh:
                number = 1
                while True:
                    while len(in_flight) >= max(1, self.upload_parallel):  # room for one more part first
                        parts.append(in_flight.popleft().result())
                    data = fh.read(self.part_bytes)
                    if not data:
                        break
                    h.update(data)
                    in_flight.append(pool.submit(send, number, data))
                    del data
                    number += 1
            while in_flight:
                parts.append(in_flight.popleft().result())
            if h.hexdigest() != staged.sha256:
                raise StorageUnavailable(f"staged upload {staged.path.name} changed before it was stored")
            with self._calls("an upload"):
                self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                      MultipartUpload=cast(Any, {"Parts": parts}))
        except BaseException:
            for pending in in_flight:
                pending.cancel()
            pool.shutdown(wait=True)  # no part may land after the abort
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception:
                log.warning("could not abort multipart upload %s of %s (the bucket's lifecycle rule must)",
                            upload_id, key, exc_info=True)
            raise
        finally:
            pool.shutdown(wait=True)

    def abort_stale_uploads(self, older_than_s: float = STALE_UPLOAD_S) -> int:
        """Abort the multipart uploads under the prefix begun over ``older_than_s`` ago; returns how many.

        An upload is aborted as soon as it fails, but not when S3 itself was unreachable at that moment
        or the process died: those parts are swept here, once per process on its first commit."""
        import datetime as dt

        now = dt.datetime.now(dt.UTC)
        aborted = 0
        with self._calls("the sweep of unfinished uploads"):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "")
            for page in pages:
                for upload in page.get("Uploads", []):
                    if (now - upload["Initiated"]).total_seconds() > older_than_s:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                           UploadId=upload["UploadId"])
                        aborted += 1
        if aborted:
            log.info("aborted %d unfinished multipart uploads in %s", aborted, self.where)
        return aborted

    def _sweep_once(self) -> None:
        if self._swept:
            return
        self._swept = True
        try:
            self.abort_stale_uploads()
        except StorageUnavailable:
            log.warning("could not sweep unfinished multipart uploads in %s", self.where, exc_info=True)

    def open(self, key: str) -> BinaryIO:
        with self._calls("a download", key):
            body = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))["Body"]
        return cast(BinaryIO, body)

    def iter_chunks(self, key: str, start: int = 0, length: int | None = None, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """A ranged GET, streamed ``chunk_size`` at a time."""
        if length is not None and length <= 0:
            return
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.object_key(key)}
        if start or length is not None:
            args["Range"] = f"bytes={start}-{'' if length is None else start + length - 1}"
        from botocore.exceptions import ClientError

        try:
            with self._calls("a download", key):
                body = self.client.get_object(**args)["Body"]
        except StorageUnavailable as exc:
            if isinstance(exc.__cause__, ClientError) and _client_error_code(exc.__cause__) == "InvalidRange":
                return  # start is at or past the end: no bytes
            raise
        try:
            with self._calls("a download", key):
                yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def local_copy(self, key: str, dest_dir: Path) -> Path:
        """The blob through the local cache (downloaded and verified on a miss), hard-linked into ``dest_dir``.

        A download that breaks off or does not verify is retried (after boto3's own retries of each
        request) ``DOWNLOAD_ATTEMPTS`` times in all; then StorageUnavailable. No partial entry is kept."""
        entry = self.cache.get(key)
        attempt = 0
        while entry is None:
            attempt += 1
            try:
                entry = self.cache.fill(key, self.iter_chunks(key, chunk_size=MIB), dest_dir)
            except BlobNotFound:
                raise
            except StorageUnavailable as exc:
                if attempt >= DOWNLOAD_ATTEMPTS:
                    raise StorageUnavailable(
                        f"blob {key[:12]}… could not be downloaded from {self.where} in {attempt} attempts: {exc}"
                    ) from exc
                log.warning("download of %s failed (attempt %d): %s; retrying", key, attempt, exc)
                time.sleep(self.retry_delay_s * 2 ** (attempt - 1))
        return link_into(entry, dest_dir)

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except BlobNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        with self._calls("a metadata read", key):
            return int(self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))["ContentLength"])

    def delete(self, key: str) -> None:
        with self._calls("a delete"):
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))
        with contextlib.suppress(FileNotFoundError):
            self.cache.path(key).unlink()

    def download_url(self, key: str, *, disposition: str, media_type: str, expires_s: int) -> str | None:
        """A presigned GET of the object for the endpoint clients reach (``presign_endpoint``; signing is
        local, nothing is sent); S3 answers it with the disposition and type the API would send."""
        if self._presign_client is None:
            self._presign_client = make_client(self.presign_endpoint) if self.presign_endpoint else self.client
        params = {"Bucket": self.bucket, "Key": self.object_key(key), "ResponseContentDisposition": disposition,
                  "ResponseContentType": media_type}
        with self._calls("presigning a download", key):
            return str(self._presign_client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s))

    def check(self) -> None:
        """The bucket answers (and exists: it is created when missing)."""
        self._bucket_ready = False
        self.ensure_bucket(self.check_client)


def make_client(endpoint_url: str | None = None, *, connect_timeout: float = 5, read_timeout: float = 60,
                max_attempts: int = 4, access_key_id: str | None = None,
                secret_access_key: str | None = None) -> S3Client:
    """A boto3 S3 client from the standard AWS_* variables (path-style addressing for a custom endpoint).

    Credentials not given here come from boto3's own chain (AWS_ACCESS_KEY_ID, ..., instance roles)."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        s3={"addressing_style": "path" if endpoint else "auto"},
        signature_version="s3v4",  # presigned URLs too (boto3 would sign those with SigV2, which servers refuse)
        # Not every S3-compatible server checks the new default CRC32 trailers; sha256 is checked here.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    session = boto3.session.Session(aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key)
    return cast(S3Client, session.client("s3", endpoint_url=endpoint, region_name=region, config=config))


def from_url(url: str) -> S3BlobStore:
    """The store of ``s3://bucket/prefix`` with the cache and part size from MODELPRESS_* settings."""
    from models.settings import get_settings

    parts = urlsplit(url)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if not bucket:
        raise StorageConfigError(f"MODELPRESS_STORAGE_URL {url!r}: an S3 URL names a bucket (s3://bucket/prefix)")
    settings = get_settings()
    if settings.s3_part_bytes < MIN_PART:
        raise StorageConfigError(f"MODELPRESS_S3_PART_BYTES must be at least {MIN_PART} (S3's smallest part)")
    return S3BlobStore(
        bucket,
        prefix,
        staging_dir=settings.home / "tmp",
        cache_dir=settings.blob_cache_dir or settings.home / "blob-cache",
        cache_bytes=settings.blob_cache_bytes,
        part_bytes=settings.s3_part_bytes,
        upload_parallel=settings.s3_upload_parallel,
        presign_endpoint=settings.s3_presign_endpoint,
    )
