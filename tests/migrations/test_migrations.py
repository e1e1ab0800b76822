"""Migrations upgrade and downgrade cleanly on SQLite and PostgreSQL, and match the models (no drift)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from migrations import downgrade, upgrade
from models.db import make_engine
from models.tables import Base
from tests.conftest import PG_ADMIN_DSN, _sqlalchemy_url

TABLES = {"models", "datasets", "jobs", "job_events", "artifacts", "blob_claims", "blob_orphans", "api_keys", "stage_cache", "workers"}


@pytest.fixture
def empty_pg() -> Iterator[str]:
    name = f"mp_mig_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield _sqlalchemy_url(f"{PG_ADMIN_DSN.rpartition('/')[0]}/{name}")
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.db'}"
    return str(request.getfixturevalue("empty_pg"))


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    upgrade(db_url)
    assert _tables(db_url) == TABLES
    downgrade(db_url)
    assert _tables(db_url) == set()
    upgrade(db_url)
    assert _tables(db_url) == TABLES


def test_autogenerate_finds_no_drift(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], diff
