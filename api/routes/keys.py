"""API keys (admin scope): create a key for any owner (its secret shown once), list, read, revoke."""

from __future__ import annotations

from fastapi import APIRouter, Response

from api.deps import DB, Admin
from api.services import keys as service
from api.services.pagination import DEFAULT_LIMIT
from models.schemas import KeyCreate, KeyCreated, KeyOut, Page

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.post("", response_model=KeyCreated, status_code=201)
def create_key(body: KeyCreate, response: Response, admin: Admin, db: DB) -> KeyCreated:
    """A new key for ``owner`` with ``scope``; the response is the only time its secret (``key``) is shown."""
    created = service.create_key(db, body.owner, body.scope, body.name)
    response.headers["Location"] = f"/v1/keys/{created.id}"
    response.headers["Cache-Control"] = "no-store"
    return created


@router.get("", response_model=Page[KeyOut])
def list_keys(
    admin: Admin, db: DB, owner: str | None = None, after: str | None = None, limit: int = DEFAULT_LIMIT,
    include_revoked: bool = True,
) -> Page[KeyOut]:
    """Every owner's keys (or one ``owner``'s), newest first; never their secrets."""
    return service.list_keys(db, owner, after, limit, include_revoked)


@router.get("/{key_id}", response_model=KeyOut)
def get_key(key_id: str, admin: Admin, db: DB) -> KeyOut:
    """One key (no secret)."""
    return service.key_out(service.get_key(db, key_id))


@router.post("/{key_id}/revoke", response_model=KeyOut)
def revoke_key(key_id: str, admin: Admin, db: DB) -> KeyOut:
    """Revoke a key: from now on it answers 401 and its page sessions end; revoking twice changes nothing."""
    return service.key_out(service.revoke_key(db, key_id))
