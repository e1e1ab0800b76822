"""Request dependencies: who the caller is (API key or page session → owner and scope) and a short DB session.

Keys: the bootstrap ``MODELPRESS_API_KEY`` acts as ``settings.owner`` with the admin scope; a per-owner
key (``mp_…``, api/services/keys.py) acts as its owner with its scope. Without ``MODELPRESS_API_KEY`` the
server is open: a request without a key acts as ``settings.owner`` (admin), one with a per-owner key as
that key's owner. Scopes: ``read`` may only GET/HEAD (403 otherwise), ``write`` anything but /v1/keys,
``admin`` everything. The page session cookie only ever reads.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated

import anyio
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.errors import ProblemError
from api.services import keys, ratelimit, sessions
from api.services.keys import Principal
from models.db import session_scope
from models.settings import Settings, get_settings


async def settings_dep() -> Settings:
    """The process settings (a dependency so tests can override it)."""
    return get_settings()


def _bootstrap(settings: Settings) -> Principal:
    return Principal(settings.owner, "admin", None)


def principal_for_key(settings: Settings, key: str | None) -> Principal | None:
    """Who a bearer key acts as, or None (wrong, unknown or revoked key; no key while one is required).

    A per-owner key is looked up in the database."""
    if key is not None and settings.api_key and hmac.compare_digest(key.encode(), settings.api_key.encode()):
        return _bootstrap(settings)
    if key is not None and keys.looks_like_key(key):
        return keys.authenticate(key)
    if not settings.api_key:
        return _bootstrap(settings)  # an open server: any other key, or none, is the local owner
    return None


def owner_for_key(settings: Settings, key: str | None) -> str | None:
    """The owner a bearer key belongs to, or None."""
    principal = principal_for_key(settings, key)
    return principal.owner if principal is not None else None


# The session cookie authenticates only reads: a cross-site form can never act with it.
SAFE_METHODS = frozenset({"GET", "HEAD"})


def bearer_key(request: Request) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, or None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def session_principal(settings: Settings, token: str | None) -> Principal | None:
    """Who a page session cookie reads as: its owner with the read scope, while its key is still active."""
    claim = sessions.claim_of(settings, token)
    if claim is None:
        return None
    if claim.key_id is None:
        return Principal(claim.owner, "read", None)
    return keys.session_principal(claim.key_id, claim.owner)


def request_principal(request: Request, settings: Settings) -> Principal | None:
    """Who this request acts as, or None: a Bearer key, else (GET/HEAD only) a page session cookie."""
    key = bearer_key(request)
    if not settings.api_key or key is not None:
        return principal_for_key(settings, key)
    if request.method in SAFE_METHODS:
        return session_principal(settings, request.cookies.get(sessions.COOKIE))
    return None


def _needs_database(request: Request, settings: Settings) -> bool:
    key = bearer_key(request)
    if key is not None:
        return keys.looks_like_key(key) and key != settings.api_key
    return bool(settings.api_key) and sessions.COOKIE in request.cookies


async def resolve_principal(request: Request, settings: Settings) -> Principal | None:
    """``request_principal``, off the event loop when it has to look a key up."""
    if _needs_database(request, settings):
        return await anyio.to_thread.run_sync(request_principal, request, settings)
    return request_principal(request, settings)


def unauthorized() -> ProblemError:
    """The 401 problem of a request without a valid key."""
    return ProblemError(
        401,
        "unauthorized",
        "missing or invalid API key (send 'Authorization: Bearer <key>')",
        headers={"WWW-Authenticate": 'Bearer realm="modelpress"'},
    )


def forbidden(principal: Principal, needed: str, what: str) -> ProblemError:
    """The 403 problem of a key whose scope does not include ``needed``."""
    return ProblemError(403, "insufficient_scope",
                        f"this API key has the {principal.scope!r} scope; {what} needs the {needed!r} scope")


async def optional_owner(request: Request, settings: Annotated[Settings, Depends(settings_dep)]) -> str | None:
    """The owner of this request, or None when an API key is configured and neither it nor a session came."""
    principal = await resolve_principal(request, settings)
    return principal.owner if principal is not None else None


async def current_principal(request: Request, settings: Annotated[Settings, Depends(settings_dep)]) -> Principal:
    """Who this request acts as: 401 without a valid key, 403 when a read key asks for anything but GET/HEAD."""
    principal = await resolve_principal(request, settings)
    if principal is None:
        raise unauthorized()
    if request.method not in SAFE_METHODS and not principal.allows("write"):
        raise forbidden(principal, "write", f"{request.method} {request.url.path}")
    return principal


async def current_owner(principal: Annotated[Principal, Depends(current_principal)]) -> str:
    """The owner of this request (see ``current_principal``)."""
    return principal.owner


async def admin_principal(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
    """An admin key's principal, else 403 (managing keys needs the admin scope)."""
    if not principal.allows("admin"):
        raise forbidden(principal, "admin", "managing API keys")
    return principal


# The rate-limited owner dependencies and their action (the OpenAPI document lists their 429).
RATE_LIMITED: dict[Callable[..., Awaitable[str]], ratelimit.Action] = {}


def bucket_before_auth(request: Request, settings: Settings) -> str | None:
    """The rate-limit bucket of a request whose key needs a database look-up (a per-owner ``mp_`` key): the
    key's id, read from the key itself. None when the caller is known without the database."""
    if not _needs_database(request, settings):
        return None
    key = bearer_key(request)
    return keys.key_id_of(key) if key is not None else None


async def _take(settings: Settings, action: ratelimit.Action, bucket: str) -> None:
    if ratelimit.uses_redis(settings):  # a network round trip: off the event loop
        await anyio.to_thread.run_sync(ratelimit.check, settings, action, bucket)
    else:
        ratelimit.check(settings, action, bucket)


def _rate_limited(action: ratelimit.Action) -> Callable[..., Awaitable[str]]:
    async def owner(request: Request, settings: Annotated[Settings, Depends(settings_dep)]) -> str:
        # The token is taken before the key is looked up, so a burst past the limit is answered 429 without
        # waiting for (or taking) a database connection.
        early = bucket_before_auth(request, settings)
        if early is not None:
            await _take(settings, action, early)
        principal = await current_principal(request, settings)
        if early is None:
            await _take(settings, action, principal.bucket)
        return principal.owner

    owner.__doc__ = f"The owner of this request after taking a token from its key's {action} bucket (429 when empty)."
    RATE_LIMITED[owner] = action
    return owner


def db_session() -> Iterator[Session]:
    """A short transaction for one request (committed when the route returns without error)."""
    with session_scope() as session:
        yield session


Owner = Annotated[str, Depends(current_owner)]
MaybeOwner = Annotated[str | None, Depends(optional_owner)]
Admin = Annotated[Principal, Depends(admin_principal)]
# Owners of rate-limited requests (api/services/ratelimit.py): uploads and job submissions.
UploadOwner = Annotated[str, Depends(_rate_limited("upload"))]
SubmitOwner = Annotated[str, Depends(_rate_limited("submit"))]
DB = Annotated[Session, Depends(db_session)]
# For routes that stream a long body: the session closes when the route returns, before the body is sent.
ShortDB = Annotated[Session, Depends(db_session, scope="function")]
