"""Model uploads (raw PUT and multipart POST) and look-ups."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from api.deps import DB, Owner, UploadOwner
from api.services import catalog, deletion, uploads
from api.services.lookup import get_owned
from api.services.pagination import DEFAULT_LIMIT
from models.schemas import ModelOut, Page
from models.tables import Model

router = APIRouter(prefix="/v1/models", tags=["models"])


def _answer(response: Response, up: uploads.Uploaded) -> ModelOut:
    response.status_code = 201 if up.created else 200
    response.headers["Location"] = f"/v1/models/{up.row.id}"
    out = catalog.model_out(up.row)  # type: ignore[arg-type]
    out.deduplicated = not up.created
    return out


@router.put("", response_model=ModelOut, status_code=201)
async def put_model(
    request: Request, response: Response, owner: UploadOwner, name: str | None = None, format: str | None = None
) -> ModelOut:
    """Upload a model as the raw body (``format`` onnx or hf); same bytes give the existing record (200)."""
    return _answer(response, await uploads.upload_raw(request, "model", owner, name, format))


@router.post("", response_model=ModelOut, status_code=201)
async def post_model(request: Request, response: Response, owner: UploadOwner) -> ModelOut:
    """Upload a model as multipart/form-data (``file``, ``name``, ``format`` parts)."""
    return _answer(response, await uploads.upload_multipart(request, "model", owner))


@router.get("", response_model=Page[ModelOut])
def list_models(
    owner: Owner, db: DB, after: str | None = None, limit: int = DEFAULT_LIMIT, sha256: str | None = None
) -> Page[ModelOut]:
    """The owner's models, newest first (``next_cursor`` feeds ``after``)."""
    return catalog.list_models(db, owner, after, limit, sha256)


@router.get("/{model_id}", response_model=ModelOut)
def get_model(model_id: str, owner: Owner, db: DB) -> ModelOut:
    """One model."""
    return catalog.model_out(get_owned(db, Model, owner, model_id))


@router.delete("/{model_id}", status_code=204, response_class=Response)
def delete_model(model_id: str, owner: Owner, db: DB) -> Response:
    """Delete the model (204); 409 while a job uses it. Its bytes go once no record of anyone refers to them."""
    deletion.delete_model(db, owner, model_id)
    return Response(status_code=204)
