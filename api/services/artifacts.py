"""Artifacts: metadata, and downloads with a strong ETag (sha256), If-None-Match and single byte ranges."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

from sqlalchemy.orm import Session

from api.errors import ProblemError
from api.services.lookup import get_owned
from api.services.numbers import parse_int64
from models.schemas import ArtifactOut
from models.tables import Artifact
from storage import BlobNotFound, get_store

CHUNK = 256 * 1024
_RANGE = re.compile(r"^\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*$", re.I)
_TOKEN = re.compile(r"^[A-Za-z0-9!#$&+.^_`|~-]+$")


def artifact_out(row: Artifact) -> ArtifactOut:
    """The response body of an artifact, with its download URL."""
    out = ArtifactOut.model_validate(row)
    out.url = f"/v1/artifacts/{row.id}/content"
    return out


def get_artifact(session: Session, owner: str, artifact_id: str) -> Artifact:
    """The owner's artifact, or 404."""
    return get_owned(session, Artifact, owner, artifact_id)


def etag_of(row: Artifact) -> str:
    """The strong entity tag of an artifact: its sha256 in quotes."""
    return f'"{row.sha256}"'


def etag_matches(header: str | None, etag: str) -> bool:
    """Whether an If-None-Match / If-Range list names ``etag`` (weak comparison, ``*`` matches)."""
    if not header:
        return False
    for candidate in header.split(","):
        tag = candidate.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single range a ``Range`` header asks for; None to send everything; 416 if unsatisfiable.

    Syntax we do not serve (several ranges, other units, garbage) is ignored, as RFC 9110 allows.
    """
    if not header:
        return None
    match = _RANGE.match(header)
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if first == "" and last == "":
        return None
    # A number past 64 bits (or thousands of digits) names no byte of any artifact: unsatisfiable.
    start_n = parse_int64(first) if first else None
    last_n = parse_int64(last) if last else None
    if (first and start_n is None) or (last and last_n is None):
        raise _unsatisfiable(size)
    if start_n is None:
        assert last_n is not None
        if last_n == 0 or size == 0:
            raise _unsatisfiable(size)
        return ByteRange(max(size - last_n, 0), size - 1)
    if last_n is not None and last_n < start_n:
        return None  # syntactically invalid: ignore
    if start_n >= size:
        raise _unsatisfiable(size)
    end = last_n if last_n is not None else size - 1
    return ByteRange(start_n, min(end, size - 1))


def _unsatisfiable(size: int) -> ProblemError:
    return ProblemError(
        416, "range_not_satisfiable", f"the requested range is outside the artifact's {size} bytes",
        headers={"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"},
    )


def content_disposition(name: str) -> str:
    """``attachment; filename=...`` for a name from the index (quoted and RFC 8187-encoded when needed)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1] or "artifact"
    if _TOKEN.match(base):
        return f"attachment; filename={base}"
    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in base)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(base, safe='')}"


def presigned_url(row: Artifact) -> str | None:
    """Where to send a client for the artifact's bytes when the store hands out direct URLs and
    MODELPRESS_S3_PRESIGN_S is set; None: the API streams them."""
    from models.settings import get_settings

    expires = get_settings().s3_presign_s
    if expires <= 0:
        return None
    return get_store().download_url(row.storage_key, disposition=content_disposition(row.name),
                                    media_type=row.media_type, expires_s=expires)


def read_blob(key: str, start: int, length: int) -> Iterator[bytes]:
    """Stream ``length`` bytes of a blob from ``start`` (iterated in a threadpool by the response)."""
    yield from get_store().iter_chunks(key, start, length, CHUNK)


def check_blob(row: Artifact) -> int:
    """The blob's size in the store; 404 problem when it is gone although the index lists it."""
    try:
        return get_store().size(row.storage_key)
    except BlobNotFound:
        raise ProblemError(404, "not_found", f"artifact {row.id} is indexed but its content is missing") from None


@dataclass(frozen=True)
class Download:
    """What a GET (or HEAD) of an artifact's content answers: status, headers and the byte span to send."""

    status: int
    headers: dict[str, str]
    start: int = 0
    length: int = 0


def plan_download(row: Artifact, range_: str | None, if_none_match: str | None, if_range: str | None) -> Download:
    """The answer to a download request: 304 on a matching ETag, 206 for a satisfiable range, else 200."""
    etag = etag_of(row)
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "private, max-age=0, must-revalidate"}
    if etag_matches(if_none_match, etag):
        return Download(304, headers)
    size = check_blob(row)
    headers["Content-Disposition"] = content_disposition(row.name)
    headers["Content-Type"] = row.media_type
    wanted = parse_range(range_, size)
    if wanted is not None and if_range is not None and if_range.strip() != etag:
        wanted = None  # the client's copy is stale: send the whole representation
    if wanted is None:
        headers["Content-Length"] = str(size)
        return Download(200, headers, 0, size)
    headers["Content-Range"] = f"bytes {wanted.start}-{wanted.end}/{size}"
    headers["Content-Length"] = str(wanted.length)
    return Download(206, headers, wanted.start, wanted.length)
