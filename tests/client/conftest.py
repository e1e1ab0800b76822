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
from typing import Any

import numpy as np
import psycopg
import pytest
from sqlalchemy.orm import Session

from models.ids import new_id
from models.tables import Artifact, Job, JobEvent
from storage.local import LocalBlobStore
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


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny ONNX model and an npz dataset that fits it."""
    d = tmp_path_factory.mktemp("client-assets")
    return {"model": tiny_onnx(d / "tiny.onnx"), "data": tiny_npz(d / "tiny.npz")}


@pytest.fixture(scope="module")
def uploaded(api_service: LiveService, assets: dict[str, Path]) -> dict[str, str]:
    """The ids of ``assets`` uploaded to this module's API."""
    from client import Client

    with Client(api_service.url) as mp:
        return {"model": mp.upload_model(assets["model"]).id, "data": mp.upload_dataset(assets["data"]).id}


def insert_job(svc: LiveService, model_id: str, status: str = "running", **fields: Any) -> str:
    """A job row in the given state (the API serves it like any other)."""
    job_id = new_id("job")
    with service_db(svc) as s:
        s.add(Job(id=job_id, owner="local", status=status, phase=fields.pop("phase", status),
                  progress=fields.pop("progress", {}), spec={"model": model_id, "steps": [{"type": "quantize"}]},
                  model_id=model_id, queue="cpu", attempt=1, **fields))
    return job_id


def add_events(svc: LiveService, job_id: str, messages: list[str]) -> list[int]:
    """Log events of a job; their ids in order."""
    with service_db(svc) as s:
        rows = [JobEvent(job_id=job_id, kind="log", message=m, data={"n": m}) for m in messages]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def set_status(svc: LiveService, job_id: str, status: str) -> None:
    """Move a job to ``status`` behind the API's back (as a worker would)."""
    with service_db(svc) as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.status = status


def job_with_artifact(svc: LiveService, model_id: str, payload: bytes) -> tuple[str, Path]:
    """A succeeded job with one artifact holding ``payload``; the job id and the blob's path in the store."""
    blob = LocalBlobStore(storage_root(svc)).put([payload])
    job_id = insert_job(svc, model_id, status="succeeded", phase="done", result={"report": {"task": "generic"}})
    with service_db(svc) as s:
        s.add(Artifact(id=new_id("art"), owner="local", job_id=job_id, name="model.onnx", kind="model",
                       media_type="application/octet-stream", sha256=blob.sha256, size_bytes=blob.size_bytes,
                       storage_key=blob.key, meta={}))
    return job_id, LocalBlobStore(storage_root(svc)).path(blob.key)
