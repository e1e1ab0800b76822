"""Per-owner API keys: made, listed, revoked, and checked for every request that presents one.

A key reads ``mp_<id>_<secret>``: ``<id>`` is the public part of the row's id (``key_<id>``) so the row is
found by primary key, ``<secret>`` is 256 random bits. Only the sha256 of the whole key is stored and it
is compared in constant time; the key itself is shown once, when it is made. A revoked key stops working
at once (every request looks the row up); ``last_used_at`` is written at most once a minute per key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from api.errors import not_found
from api.services.pagination import paginate
from models.db import get_engine, session_scope
from models.ids import new_id
from models.schemas import KeyCreated, KeyOut, Page
from models.tables import SCOPES, ApiKey, utcnow

KEY_PREFIX = "mp_"
ID_PREFIX = "key_"
TOUCH_INTERVAL = timedelta(seconds=60)
MAX_KEY_CHARS = 200


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: the owner, the key's scope, and the key's id (None: the bootstrap key or no auth)."""

    owner: str
    scope: str
    key_id: str | None = None

    def allows(self, scope: str) -> bool:
        """Whether this principal's scope includes ``scope`` (read < write < admin)."""
        return SCOPES.index(self.scope) >= SCOPES.index(scope)

    @property
    def bucket(self) -> str:
        """The rate-limit bucket of this key (the bootstrap key and the open server have one each per owner)."""
        return self.key_id or f"owner:{self.owner}"


def digest(key: str) -> str:
    """The stored form of a key: sha256 of the whole key, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def looks_like_key(token: str) -> bool:
    """Whether a bearer token has the form of a per-owner key (``mp_<id>_<secret>``)."""
    return token.startswith(KEY_PREFIX)


def key_id_of(token: str) -> str | None:
    """The row id a per-owner key names (``key_<id>``), or None when the token is not of that form."""
    if not looks_like_key(token) or len(token) > MAX_KEY_CHARS:
        return None
    public, sep, secret = token[len(KEY_PREFIX):].partition("_")
    if not sep or not public or not secret or not (public.isascii() and public.isalnum()):
        return None
    return ID_PREFIX + public


def key_out(row: ApiKey) -> KeyOut:
    """The listed form of a key (no secret)."""
    return KeyOut.model_validate(row)


def create_key(session: Session, owner: str, scope: str, name: str = "") -> KeyCreated:
    """A new key for ``owner``: the row is committed with the key's digest; the key is returned this once."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    key_id = new_id("key")
    key = f"{KEY_PREFIX}{key_id[len(ID_PREFIX):]}_{secrets.token_urlsafe(32)}"
    row = ApiKey(id=key_id, owner=owner, name=name.strip(), scope=scope, secret_sha256=digest(key),
                 created_at=utcnow())
    session.add(row)
    session.commit()
    return KeyCreated(**key_out(row).model_dump(), key=key)


def list_keys(
    session: Session, owner: str | None, after: str | None, limit: int, include_revoked: bool = True
) -> Page[KeyOut]:
    """A page of keys, newest first, of one owner or of every owner."""
    query = select(ApiKey)
    if owner is not None:
        query = query.where(ApiKey.owner == owner)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    rows, cursor = paginate(session, query, ApiKey.id, after, limit)
    return Page[KeyOut](data=[key_out(r) for r in rows], next_cursor=cursor)


def get_key(session: Session, key_id: str) -> ApiKey:
    """One key by id, else 404."""
    row = session.get(ApiKey, key_id, populate_existing=True)
    if row is None:
        raise not_found("key", key_id)
    return row


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Revoke a key (it answers 401 from now on); revoking it again changes nothing."""
    row = get_key(session, key_id)
    if row.revoked_at is None:
        session.execute(
            update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        session.commit()
        row = get_key(session, key_id)
    return row


def authenticate(token: str) -> Principal | None:
    """The principal of a per-owner key, or None when it is malformed, unknown, wrong or revoked.

    One primary-key read on an autocommit connection (every request with a key makes it); a use is
    recorded at most once per TOUCH_INTERVAL per key, by a guarded UPDATE that only one process wins."""
    key_id = key_id_of(token)
    if key_id is None:
        return None
    t = ApiKey.__table__
    with get_engine().execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
        row = conn.execute(
            select(t.c.owner, t.c.scope, t.c.secret_sha256, t.c.revoked_at, t.c.last_used_at).where(t.c.id == key_id)
        ).first()
        # Compared even when the row is missing, so an unknown id takes as long as a wrong secret.
        stored = row.secret_sha256 if row is not None else "0" * 64
        if not hmac.compare_digest(digest(token).encode(), stored.encode()) or row is None:
            return None
        if row.revoked_at is not None:
            return None
        now = utcnow()
        if row.last_used_at is None or now - row.last_used_at >= TOUCH_INTERVAL:
            conn.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id,
                       or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - TOUCH_INTERVAL))
                .values(last_used_at=now)
            )
        return Principal(row.owner, row.scope, key_id)


def session_principal(key_id: str, owner: str) -> Principal | None:
    """The principal behind a page session signed in with key ``key_id``: None once that key is revoked."""
    with session_scope() as session:
        row = session.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None or row.owner != owner:
            return None
        return Principal(row.owner, "read", row.id)

