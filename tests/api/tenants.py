"""Helpers for the tenant tests: an API with the bootstrap key set, per-owner keys made in the database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

BOOTSTRAP = "bootstrap-s3cret"


def bearer(key: str) -> dict[str, str]:
    """The Authorization header of ``key``."""
    return {"Authorization": f"Bearer {key}"}


def make_key(owner: str, scope: str = "write", name: str = "") -> tuple[str, str]:
    """A new key of ``owner`` made as ``modelpress keys create`` makes it: (key id, key)."""
    from api.services import keys
    from models.db import session_scope

    with session_scope() as session:
        created = keys.create_key(session, owner, scope, name)
    return created.id, created.key


@pytest.fixture
def keyed(pg_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The API with MODELPRESS_API_KEY (the bootstrap admin key of the ``local`` owner) set."""
    from api.main import create_app
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_API_KEY", BOOTSTRAP)
    monkeypatch.delenv("MODELPRESS_SECRET_KEY", raising=False)
    get_settings.cache_clear()
    with TestClient(create_app(), raise_server_exceptions=False) as c:
        yield c
    get_settings.cache_clear()
