"""Dataset uploads (raw PUT and multipart POST) and look-ups."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from api.deps import DB, Owner, UploadOwner
from api.services import catalog, deletion, uploads
from api.services.lookup import get_owned
from api.services.pagination import DEFAULT_LIMIT
from models.schemas import DatasetOut, Page
from models.tables import Dataset

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def _answer(response: Response, up: uploads.Uploaded) -> DatasetOut:
    response.status_code = 201 if up.created else 200
    response.headers["Location"] = f"/v1/datasets/{up.row.id}"
    out = catalog.dataset_out(up.row)  # type: ignore[arg-type]
    out.deduplicated = not up.created
    return out


@router.put("", response_model=DatasetOut, status_code=201)
async def put_dataset(
    request: Request, response: Response, owner: UploadOwner, name: str | None = None, format: str | None = None
) -> DatasetOut:
    """Upload a dataset as the raw body (``format`` npz, imagefolder or text); same bytes give the existing one."""
    return _answer(response, await uploads.upload_raw(request, "dataset", owner, name, format))


@router.post("", response_model=DatasetOut, status_code=201)
async def post_dataset(request: Request, response: Response, owner: UploadOwner) -> DatasetOut:
    """Upload a dataset as multipart/form-data (``file``, ``name``, ``format`` parts)."""
    return _answer(response, await uploads.upload_multipart(request, "dataset", owner))


@router.get("", response_model=Page[DatasetOut])
def list_datasets(
    owner: Owner, db: DB, after: str | None = None, limit: int = DEFAULT_LIMIT, sha256: str | None = None
) -> Page[DatasetOut]:
    """The owner's datasets, newest first (``next_cursor`` feeds ``after``)."""
    return catalog.list_datasets(db, owner, after, limit, sha256)


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, owner: Owner, db: DB) -> DatasetOut:
    """One dataset."""
    return catalog.dataset_out(get_owned(db, Dataset, owner, dataset_id))


@router.delete("/{dataset_id}", status_code=204, response_class=Response)
def delete_dataset(dataset_id: str, owner: Owner, db: DB) -> Response:
    """Delete the dataset (204); 409 while a job uses it. Its bytes go once no record of anyone refers to them."""
    deletion.delete_dataset(db, owner, dataset_id)
    return Response(status_code=204)
