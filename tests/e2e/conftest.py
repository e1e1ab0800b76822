"""Live-service fixtures: on Redis + PostgreSQL, on Redis + PostgreSQL + S3 (nothing shared), on the embedded defaults."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import PG_ADMIN_DSN, RUN_ID, _sqlalchemy_url
from tests.e2e.harness import LiveService, live_service, service_env
from tests.e2e.pg_server import private_pg  # noqa: F401  (the fixture, for tests that restart PostgreSQL)


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[LiveService]:
    """API + worker on PostgreSQL (a database of this module's own) and Redis."""
    name = f"mp_e2e_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rpartition("/")[0]
    home = tmp_path_factory.mktemp("distributed")
    # A queue of its own: two live stacks on one Redis must never take each other's tasks.
    env = service_env(home, name, database_url=_sqlalchemy_url(f"{base}/{name}"), broker_url=redis_url)
    try:
        with live_service(home, env) as svc:
            yield svc
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """API + worker on the embedded defaults: SQLite database and SQLite broker under a fresh home."""
    home = tmp_path_factory.mktemp("embedded")
    with live_service(home, service_env(home, RUN_ID)) as svc:
        yield svc


@pytest.fixture(scope="module")
def distributed_s3(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, s3_server: object
) -> Iterator[LiveService]:
    """API + worker on PostgreSQL, Redis and S3 (SeaweedFS) only: each has a home of its own, no shared folder."""
    from tests.storage.seaweed import Weed

    assert isinstance(s3_server, Weed)
    name = f"mp_e2e_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rpartition("/")[0]
    api_home, worker_home = tmp_path_factory.mktemp("s3-api"), tmp_path_factory.mktemp("s3-worker")
    shared = {"database_url": _sqlalchemy_url(f"{base}/{name}"), "broker_url": redis_url,
              "storage_url": f"s3://mp-e2e-{RUN_ID}-{uuid.uuid4().hex[:6]}/blobs"}
    api_env = {**service_env(api_home, name, **shared), **s3_server.env()}
    worker_env = {**service_env(worker_home, name, **shared), **s3_server.env()}
    try:
        with live_service(api_home, api_env, worker_env=worker_env) as svc:
            yield svc
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module", params=["distributed", "distributed_s3"])
def stack(request: pytest.FixtureRequest) -> LiveService:
    """The distributed service, twice: on a shared local store, then on S3 with nothing shared but the services
    (a test that takes ``stack`` runs on both)."""
    svc: LiveService = request.getfixturevalue(request.param)
    return svc
