"""Shared fixtures: a fresh PostgreSQL database per test session, Redis, isolated MODELPRESS_HOME."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

PG_ADMIN_DSN = os.environ.get("MODELPRESS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MODELPRESS_TEST_REDIS", "redis://127.0.0.1:6379/0")
RUN_ID = uuid.uuid4().hex[:8]


def _sqlalchemy_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A new, migrated PostgreSQL database for this test session, dropped at the end."""
    name = f"mp_test_{RUN_ID}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = PG_ADMIN_DSN.rpartition("/")
    url = _sqlalchemy_url(f"{base}/{name}")
    from migrations import upgrade

    upgrade(url)
    yield url
    from models.db import reset_engines

    reset_engines()
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis server (fails loudly when it is not running)."""
    redis.Redis.from_url(REDIS_URL).ping()
    return REDIS_URL


def _apply_env(monkeypatch: pytest.MonkeyPatch, home: Path, **env: str) -> None:
    from models.db import reset_engines
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_HOME", str(home))
    for key in ("DATABASE_URL", "BROKER_URL", "STORAGE_DIR", "MAX_UPLOAD_BYTES", "CPU_QUEUE", "GPU_QUEUE",
                "API_KEY", "JOB_READ_CACHE_S", "PUBLIC_DOCS", "MAX_JSON_BODY_BYTES", "QUOTA_STORED_BYTES",
                "QUOTA_ACTIVE_JOBS", "UPLOAD_RATE_PER_MINUTE", "SUBMIT_RATE_PER_MINUTE"):
        monkeypatch.delenv(f"MODELPRESS_{key}", raising=False)
    # In-process API tests change job rows behind the API's back: no read cache unless a test asks.
    monkeypatch.setenv("MODELPRESS_JOB_READ_CACHE_S", "0")
    # One process runs every API test as the same owner: no per-key rate limits unless a test asks.
    monkeypatch.setenv("MODELPRESS_UPLOAD_RATE_PER_MINUTE", "0")
    monkeypatch.setenv("MODELPRESS_SUBMIT_RATE_PER_MINUTE", "0")
    for key, value in env.items():
        monkeypatch.setenv(f"MODELPRESS_{key.upper()}", value)
    get_settings.cache_clear()
    reset_engines()


def _truncate(url: str) -> None:
    from sqlalchemy import text

    from models.db import make_engine

    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE job_events, artifacts, jobs, datasets, models, blob_claims, blob_orphans, api_keys, stage_cache, workers RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture
def pg_env(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """MODELPRESS_* pointing at the session's PostgreSQL database and a private home; tables emptied after."""
    _apply_env(
        monkeypatch,
        tmp_path / "home",
        database_url=pg_url,
        cpu_queue=f"cpu-{RUN_ID}",
        gpu_queue=f"gpu-{RUN_ID}",
    )
    yield pg_url
    from models.db import reset_engines
    from models.settings import get_settings

    reset_engines()
    _truncate(pg_url)
    get_settings.cache_clear()


@pytest.fixture
def sqlite_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Embedded defaults (SQLite database and broker) under a private, migrated home."""
    home = tmp_path / "home"
    _apply_env(monkeypatch, home)
    from migrations import upgrade
    from models.settings import get_settings

    upgrade()
    yield get_settings().database_url
    from models.db import reset_engines

    reset_engines()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real S3 endpoint for this test session: SeaweedFS ``weed mini`` on free ports, stopped at the end."""
    from tests.storage.seaweed import weed_mini

    with weed_mini(tmp_path_factory.mktemp("seaweedfs")) as weed:
        yield weed


@pytest.fixture
def s3_env(s3_server: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """MODELPRESS_STORAGE_URL=s3://… on the session's SeaweedFS (a bucket of this test's own) + the AWS_* variables."""
    from models.settings import get_settings
    from storage import backends
    from tests.storage.seaweed import Weed

    assert isinstance(s3_server, Weed)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    url = f"s3://mp-{RUN_ID}-{uuid.uuid4().hex[:8]}/blobs"
    monkeypatch.setenv("MODELPRESS_STORAGE_URL", url)
    monkeypatch.setattr(backends, "_STORES", {})
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()
