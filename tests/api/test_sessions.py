"""api.services.sessions: the pages' signed, expiring session cookie."""

from __future__ import annotations

import base64

import pytest

from api.services import sessions
from models.settings import Settings

NOW = 1_800_000_000.0


def _settings(**kw: object) -> Settings:
    return Settings(api_key="s3cret", session_ttl_s=600, **kw)  # type: ignore[arg-type]


def test_a_fresh_cookie_names_its_owner_until_it_expires() -> None:
    s = _settings()
    token = sessions.issue(s, "local", now=NOW)
    assert sessions.owner_of(s, token, now=NOW) == "local"
    assert sessions.owner_of(s, token, now=NOW + 599) == "local"
    assert sessions.owner_of(s, token, now=NOW + 600) is None
    owner_b64, expires, _ = token.split(".")
    assert base64.urlsafe_b64decode(owner_b64 + "==") == b"local" and int(expires) == NOW + 600


def test_any_change_to_the_cookie_breaks_it() -> None:
    s = _settings()
    token = sessions.issue(s, "local", now=NOW)
    owner_b64, expires, sig = token.split(".")
    forged_owner = base64.urlsafe_b64encode(b"admin").rstrip(b"=").decode()
    for bad in (f"{owner_b64}.{int(expires) + 3600}.{sig}", f"{forged_owner}.{expires}.{sig}",
                f"{owner_b64}.{expires}.{sig[::-1]}", f"{owner_b64}.{expires}", token + ".x", "", None, "a.b.c"):
        assert sessions.owner_of(s, bad, now=NOW) is None, bad


def test_the_key_decides() -> None:
    token = sessions.issue(_settings(), "local", now=NOW)
    assert sessions.owner_of(Settings(api_key="rotated", session_ttl_s=600), token, now=NOW) is None
    # A separate secret signs the cookie; changing the API key still ends the session.
    signed = sessions.issue(_settings(secret_key="k1"), "local", now=NOW)
    assert sessions.owner_of(_settings(secret_key="k1"), signed, now=NOW) == "local"
    assert sessions.owner_of(_settings(secret_key="k2"), signed, now=NOW) is None
    assert sessions.owner_of(_settings(), signed, now=NOW) is None
    assert sessions.owner_of(Settings(api_key="other", secret_key="k1"), signed, now=NOW) is None


def test_only_the_keys_owner_and_only_with_a_key() -> None:
    s = _settings()
    assert sessions.owner_of(s, sessions.issue(s, "someone-else", now=NOW), now=NOW) is None
    with pytest.raises(ValueError):
        sessions.issue(Settings(api_key=None), "local")
    assert sessions.owner_of(Settings(api_key=None), sessions.issue(s, "local", now=NOW), now=NOW) is None
