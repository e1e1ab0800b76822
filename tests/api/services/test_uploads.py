"""api.services.uploads when PostgreSQL goes away between storing an upload's blob and inserting its row."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from api.services import uploads
from tests.api.builders import onnx_bytes
from tests.api.conftest import blobs, temp_files
from tests.conftest import _apply_env
from tests.e2e.pg_server import PgServer, private_pg  # noqa: F401  (fixture)


@pytest.fixture
def on_private_pg(private_pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PgServer]:  # noqa: F811
    from migrations import upgrade
    from models.db import reset_engines

    upgrade(private_pg.url)
    _apply_env(monkeypatch, tmp_path / "home", database_url=private_pg.url)
    yield private_pg
    reset_engines()


def _outage_after_inspection(monkeypatch: pytest.MonkeyPatch, pg: PgServer, down_s: float | None) -> None:
    """Stop PostgreSQL right after the upload is inspected (its blob is stored next); back after ``down_s``."""
    real = uploads._inspect

    def inspect_then_stop(*args: Any) -> dict[str, Any]:
        meta = real(*args)
        pg.stop()
        if down_s is not None:
            threading.Timer(down_s, pg.start).start()
        return meta

    monkeypatch.setattr(uploads, "_inspect", inspect_then_stop)


def _models(pg: PgServer) -> int:
    with psycopg.connect(pg.dsn) as conn:
        row = conn.execute("SELECT count(*) FROM models").fetchone()
    return int(row[0]) if row else -1


def test_the_insert_waits_for_a_restarting_database(on_private_pg: PgServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from api.main import create_app
    from models.settings import get_settings

    _outage_after_inspection(monkeypatch, on_private_pg, down_s=1.0)
    with TestClient(create_app(), raise_server_exceptions=False) as c:
        t0 = time.monotonic()
        r = c.put("/v1/models", params={"format": "onnx"}, content=onnx_bytes())
    assert r.status_code == 201, r.text
    assert time.monotonic() - t0 >= 1.0 and _models(on_private_pg) == 1
    assert len(blobs(get_settings().blob_dir)) == 1 and temp_files(get_settings().blob_dir) == []


def test_a_database_down_past_the_retries_is_a_503_and_takes_its_new_blob_back(
    on_private_pg: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.main import create_app
    from models.settings import get_settings

    monkeypatch.setattr(uploads, "INSERT_RETRY_S", 0.5)
    _outage_after_inspection(monkeypatch, on_private_pg, down_s=None)
    store = get_settings().blob_dir
    with TestClient(create_app(), raise_server_exceptions=False) as c:
        r = c.put("/v1/models", params={"format": "onnx"}, content=onnx_bytes())
        assert r.status_code == 503, r.text
        assert r.headers["content-type"].startswith("application/problem+json") and r.headers["retry-after"]
        assert r.json()["code"] == "database_unavailable"
        assert blobs(store) == [] and temp_files(store) == []
        on_private_pg.start()
        assert _models(on_private_pg) == 0
        monkeypatch.undo()
        again = c.put("/v1/models", params={"format": "onnx"}, content=onnx_bytes())
    assert again.status_code == 201, again.text
    assert _models(on_private_pg) == 1 and len(blobs(store)) == 1
