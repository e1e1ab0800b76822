"""A real API server (uvicorn subprocess on its own PostgreSQL database and Redis) for SDK/CLI tests.

``api_service`` runs the API only (jobs stay queued: rows are inserted directly where a test needs a
job in some state); ``live_worker_service`` adds a real Celery worker (tests marked ``e2e``).
Both reuse ``tests.e2e.harness``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psycopg
import pytest
from sqlalchemy.orm import Session

from tests.conftest import PG_ADMIN_DSN, RUN_ID, _sqlalchemy_url
from tests.e2e.harness import LiveService, live_service, service_env


@contextmanager
def _service(tmp_path_factory: pytest.TempPathFactory, redis_url: str, worker: bool) -> Iterator[LiveService]:
    name = f"mp_client_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    home = tmp_path_factory.mktemp("client-svc")
    base = PG_ADMIN_DSN.rpartition("/")[0]
    # Queues of this service alone, so a worker of another test module never takes these jobs.
    tag = uuid.uuid4().hex[:6]
    env = service_env(home, f"{RUN_ID}-{tag}", database_url=_sqlalchemy_url(f"{base}/{name}"), broker_url=redis_url)
    try:
        with live_service(home, env, worker=worker) as svc:
            yield svc
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def api_service(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[LiveService]:
    """The API alone (no worker)."""
    with _service(tmp_path_factory, redis_url, worker=False) as svc:
        yield svc


@pytest.fixture(scope="module")
def live_worker_service(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[LiveService]:
    """The API and a real Celery worker."""
    with _service(tmp_path_factory, redis_url, worker=True) as svc:
        yield svc


@contextmanager
def service_db(svc: LiveService) -> Iterator[Session]:
    """A session on the service's database (commit on success)."""
    from models.db import make_engine

    engine = make_engine(svc.env["MODELPRESS_DATABASE_URL"])
    try:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            yield session
    finally:
        engine.dispose()


def storage_root(svc: LiveService) -> Path:
    """The service's blob store root (embedded default under its home)."""
    return svc.home / "storage"


def tiny_onnx(path: Path, features: int = 8, classes: int = 3, seed: int = 0) -> Path:
    """A linear classifier ``logits = x @ W + b`` as ONNX (input ``x``), built without torch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(features, classes)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.normal(size=(classes,)).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_npz(path: Path, n: int = 64, features: int = 8, classes: int = 3, seed: int = 1) -> Path:
    """An npz dataset for ``tiny_onnx``: ``x`` and ``labels``."""
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.normal(size=(n, features)).astype(np.float32), labels=rng.integers(0, classes, n))
    return path
