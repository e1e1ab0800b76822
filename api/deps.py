"""Request dependencies: who the caller is (API key or page session → owner) and a short DB session per request."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.errors import ProblemError
from api.services import sessions
from models.db import session_scope
from models.settings import Settings, get_settings


async def settings_dep() -> Settings:
    """The process settings (a dependency so tests can override it)."""
    return get_settings()


def owner_for_key(settings: Settings, key: str | None) -> str | None:
    """The owner a bearer key belongs to, or None; one local owner for now (keys per owner come later)."""
    if not settings.api_key:
        return settings.owner
    if key is not None and hmac.compare_digest(key.encode(), settings.api_key.encode()):
        return settings.owner
    return None


# The session cookie authenticates only reads: a cross-site form can never act with it.
SAFE_METHODS = frozenset({"GET", "HEAD"})


def bearer_key(request: Request) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, or None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def request_owner(request: Request, settings: Settings) -> str | None:
    """The owner of this request, or None: a Bearer key, else (GET/HEAD only) a page session cookie."""
    key = bearer_key(request)
    if not settings.api_key or key is not None:
        return owner_for_key(settings, key)
    if request.method in SAFE_METHODS:
        return sessions.owner_of(settings, request.cookies.get(sessions.COOKIE))
    return None


def unauthorized() -> ProblemError:
    """The 401 problem of a request without a valid key."""
    return ProblemError(
        401,
        "unauthorized",
        "missing or invalid API key (send 'Authorization: Bearer <key>')",
        headers={"WWW-Authenticate": 'Bearer realm="modelpress"'},
    )


async def optional_owner(request: Request, settings: Annotated[Settings, Depends(settings_dep)]) -> str | None:
    """The owner of this request, or None when an API key is configured and neither it nor a session came."""
    return request_owner(request, settings)


async def current_owner(request: Request, settings: Annotated[Settings, Depends(settings_dep)]) -> str:
    """The owner of this request; 401 problem when an API key is configured and not presented."""
    owner = request_owner(request, settings)
    if owner is None:
        raise unauthorized()
    return owner


def db_session() -> Iterator[Session]:
    """A short transaction for one request (committed when the route returns without error)."""
    with session_scope() as session:
        yield session


Owner = Annotated[str, Depends(current_owner)]
MaybeOwner = Annotated[str | None, Depends(optional_owner)]
DB = Annotated[Session, Depends(db_session)]
# For routes that stream a long body: the session closes when the route returns, before the body is sent.
ShortDB = Annotated[Session, Depends(db_session, scope="function")]
