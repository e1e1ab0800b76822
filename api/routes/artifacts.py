"""Artifacts: metadata and downloads (ETag, If-None-Match, single byte Range)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import StreamingResponse

from api.deps import DB, Owner, ShortDB
from api.services import artifacts as service
from api.services import deletion
from models.schemas import ArtifactOut

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])


@router.get("/{artifact_id}", response_model=ArtifactOut)
def get_artifact(artifact_id: str, owner: Owner, db: DB) -> ArtifactOut:
    """An artifact's metadata (name, kind, sha256, size, download URL)."""
    return service.artifact_out(service.get_artifact(db, owner, artifact_id))


@router.get("/{artifact_id}/content", response_model=None)
def download(
    artifact_id: str,
    owner: Owner,
    db: ShortDB,
    range_: Annotated[str | None, Header(alias="Range")] = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
    if_range: Annotated[str | None, Header(alias="If-Range")] = None,
) -> Response:
    """The artifact's bytes, streamed; 304 when the ETag matches, 206 for a satisfiable byte range."""
    row = service.get_artifact(db, owner, artifact_id)
    etag = service.etag_of(row)
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "private, max-age=0, must-revalidate"}
    if service.etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    size = service.check_blob(row)
    headers["Content-Disposition"] = service.content_disposition(row.name)
    wanted = service.parse_range(range_, size)
    if wanted is not None and if_range is not None and if_range.strip() != etag:
        wanted = None  # the client's copy is stale: send the whole representation
    if wanted is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(
            service.read_blob(row.storage_key, 0, size), media_type=row.media_type, headers=headers
        )
    headers["Content-Range"] = f"bytes {wanted.start}-{wanted.end}/{size}"
    headers["Content-Length"] = str(wanted.length)
    return StreamingResponse(
        service.read_blob(row.storage_key, wanted.start, wanted.length),
        status_code=206,
        media_type=row.media_type,
        headers=headers,
    )


@router.delete("/{artifact_id}", status_code=204, response_class=Response)
def delete_artifact(artifact_id: str, owner: Owner, db: DB) -> Response:
    """Delete one artifact (204); its job stays. The bytes go once no record of anyone refers to them."""
    deletion.delete_artifact(db, owner, artifact_id)
    return Response(status_code=204)
