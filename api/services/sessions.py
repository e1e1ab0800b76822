"""Browser sessions for the HTML pages: a signed, expiring cookie naming the owner (HMAC-SHA256).

The cookie is ``<owner[NUL key id], base64url>.<expiry, unix s>.<signature>``; the signing key is derived
from ``MODELPRESS_SECRET_KEY`` (or the API key) and the API key, so changing the API key ends every session.
A session signed in with a per-owner key names that key, so revoking the key ends the session (api/deps.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass

from api.services.numbers import parse_int64
from models.settings import Settings

COOKIE = "modelpress_session"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _signing_key(settings: Settings) -> bytes | None:
    if not settings.api_key:
        return None
    secret = (settings.secret_key or settings.api_key).encode()
    key_id = hashlib.sha256(settings.api_key.encode()).digest()
    return hmac.new(secret, b"modelpress session v1\0" + key_id, hashlib.sha256).digest()


def _sign(key: bytes, body: str) -> str:
    return _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())


@dataclass(frozen=True)
class Claim:
    """What a valid cookie says: the owner, and the per-owner key it was signed in with (None: the bootstrap key)."""

    owner: str
    key_id: str | None = None


def issue(settings: Settings, owner: str, now: float | None = None, key_id: str | None = None) -> str:
    """A session cookie value for ``owner`` (signed in with key ``key_id``), valid for ``session_ttl_s`` seconds."""
    key = _signing_key(settings)
    if key is None:
        raise ValueError("sessions need an API key")
    expires = int((time.time() if now is None else now) + settings.session_ttl_s)
    subject = owner if key_id is None else f"{owner}\0{key_id}"
    body = f"{_b64(subject.encode())}.{expires}"
    return f"{body}.{_sign(key, body)}"


def owner_of(settings: Settings, token: str | None, now: float | None = None) -> str | None:
    """The owner a bootstrap-key session cookie names, or None (missing, tampered with, expired, or a key's)."""
    claim = claim_of(settings, token, now)
    return claim.owner if claim is not None and claim.key_id is None else None


def claim_of(settings: Settings, token: str | None, now: float | None = None) -> Claim | None:
    """What a session cookie says, or None when it is missing, tampered with or expired.

    A bootstrap session is good only for the owner the bootstrap key maps to; a per-owner key's session
    names its key, which the caller checks is still active and still that owner's."""
    key = _signing_key(settings)
    if key is None or not token or token.count(".") != 2:
        return None
    body, _, signature = token.rpartition(".")
    if not hmac.compare_digest(signature.encode(), _sign(key, body).encode()):
        return None
    owner_b64, _, expires = body.partition(".")
    expires_at = parse_int64(expires)
    if expires_at is None or expires_at <= (time.time() if now is None else now):
        return None
    try:
        subject = base64.urlsafe_b64decode(owner_b64 + "=" * (-len(owner_b64) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    owner, sep, key_id = subject.partition("\0")
    if sep:
        return Claim(owner, key_id) if owner and key_id else None
    return Claim(owner) if owner == settings.owner else None
