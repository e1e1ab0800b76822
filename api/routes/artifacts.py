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
    """The artifact's bytes, streamed; 304 when the ETag matches, 206 for a satisfiable byte range; with
    MODELPRESS_S3_PRESIGN_S on an S3 store, a 307 to a presigned URL of the object (send Range there)."""
    row = service.get_artifact(db, owner, artifact_id)
    plan = service.plan_download(row, range_, if_none_match, if_range)
    if plan.status == 304:
        return Response(status_code=304, headers=plan.headers)
    direct = service.presigned_url(row)
    if direct is not None:
        return Response(status_code=307, headers={"Location": direct, "ETag": plan.headers["ETag"],
                                                  "Cache-Control": "private, no-store"})
    return StreamingResponse(
        service.read_blob(row.storage_key, plan.start, plan.length),
        status_code=plan.status,
        media_type=row.media_type,
        headers=plan.headers,
    )


@router.head("/{artifact_id}/content", response_model=None)
def head_download(
    artifact_id: str,
    owner: Owner,
    db: ShortDB,
    range_: Annotated[str | None, Header(alias="Range")] = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
    if_range: Annotated[str | None, Header(alias="If-Range")] = None,
) -> Response:
    """What GET would answer (status, ``Content-Length``, ``ETag``, type, disposition), without the bytes."""
    row = service.get_artifact(db, owner, artifact_id)
    plan = service.plan_download(row, range_, if_none_match, if_range)
    return Response(status_code=plan.status, headers=plan.headers)


@router.delete("/{artifact_id}", status_code=204, response_class=Response)
def delete_artifact(artifact_id: str, owner: Owner, db: DB) -> Response:
    """Delete one artifact (204); its job stays. The bytes go once no record of anyone refers to them."""
    deletion.delete_artifact(db, owner, artifact_id)
    return Response(status_code=204)
