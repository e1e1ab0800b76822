"""PostgreSQL goes away under a running service: no job lost, none run twice, nothing left behind.

The service (uvicorn + a Celery worker on Redis) runs on a PostgreSQL server of this module's own
(``tests/e2e/pg_server.py``), which the tests stop and start while a job runs and while an upload streams.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import psycopg
import pytest

from tests.conftest import RUN_ID
from tests.e2e.harness import LiveService, live_service, service_env
from tests.e2e.pg_server import PgServer, pg_server
from tests.factories import digits_split, train_digits_mlp_onnx, write_npz

pytestmark = pytest.mark.e2e

OUTAGE_S = 2.0  # PostgreSQL is down this long: longer than one retry, shorter than the retry windows


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    with pg_server() as server:
        yield server


@pytest.fixture(scope="module")
def svc(pg: PgServer, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    home = tmp_path_factory.mktemp("pg-faults")
    run = f"{RUN_ID}-{uuid.uuid4().hex[:4]}"  # queues of this module's own: no other worker takes its tasks
    with live_service(home, service_env(home, run, database_url=pg.url, broker_url=redis_url)) as service:
        yield service


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pg-faults-inputs")
    model = folder / "mlp.onnx"
    train_digits_mlp_onnx(model, epochs=40)
    name = onnx.load(str(model)).graph.input[0].name
    (x_tr, y_tr), (x_ev, y_ev) = digits_split()
    return {"model": model, "train": write_npz(folder / "train.npz", x_tr, y_tr, name),
            "eval": write_npz(folder / "eval.npz", x_ev, y_ev, name),
            "big": write_npz(folder / "big.npz", np.tile(x_tr, (4, 1)), np.tile(y_tr, 4), name)}


def _outage(pg: PgServer, seconds: float = OUTAGE_S) -> None:
    pg.stop()
    time.sleep(seconds)
    pg.start()


def _rows(pg: PgServer, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.dsn) as conn:
        return list(conn.execute(sql, params).fetchall())


def _home_files(svc: LiveService) -> set[Path]:
    """Every file under the service's home except logs and the (SQLite-free) broker's nothing."""
    return {p for p in svc.home.rglob("*") if p.is_file() and p.suffix != ".log"}


def _blob_files(svc: LiveService) -> set[str]:
    storage = svc.home / "storage"
    return {p.name for p in storage.rglob("*") if p.is_file() and p.parent.name != "tmp" and len(p.name) == 64}


def _upload(client: httpx.Client, kind: str, path: Path, fmt: str) -> dict[str, Any]:
    r = client.put(f"/v1/{kind}", params={"name": path.name, "format": fmt}, content=path.read_bytes())
    assert r.status_code in (200, 201), r.text
    return dict(r.json())


def _assert_nothing_left_behind(svc: LiveService, pg: PgServer) -> None:
    """Every blob belongs to a record (or a stage-cache entry) and every record's blob is there; no staged or job
    temp file remains."""
    keys = {k for (k,) in _rows(pg, "SELECT storage_key FROM models UNION SELECT storage_key FROM datasets "
                                    "UNION SELECT storage_key FROM artifacts "
                                    "UNION SELECT blob_key FROM stage_cache WHERE blob_key IS NOT NULL")}
    assert _blob_files(svc) == keys
    stray = {p for p in _home_files(svc) if not (p.name in keys and "storage" in p.parts)}
    assert stray == set(), stray


def _exactly_once(pg: PgServer, job: dict[str, Any]) -> None:
    """One success, one claim per attempt (a reclaim after the lease is clean), one artifact per name."""
    job_id = job["id"]
    statuses = [d["status"] for (d,) in _rows(pg, "SELECT data FROM job_events WHERE job_id = %s AND kind = 'status' "
                                                  "ORDER BY id", job_id)]
    assert statuses.count("succeeded") == 1 and statuses[-1] == "succeeded", statuses
    assert statuses.count("running") == job["attempt"], statuses
    arts = _rows(pg, "SELECT name, count(*) FROM artifacts WHERE job_id = %s GROUP BY name", job_id)
    assert dict(arts) == {"model.onnx": 1, "report.json": 1}, arts


def test_postgres_restart_while_a_job_runs(svc: LiveService, pg: PgServer, inputs: dict[str, Path]) -> None:
    """A finetune is training and two quantize jobs wait in the queue when PostgreSQL goes down for 2 s."""
    latency = {"latency": {"runs": 5, "warmup": 1}}
    with httpx.Client(base_url=svc.url, timeout=30) as client:
        model = _upload(client, "models", inputs["model"], "onnx")
        train = _upload(client, "datasets", inputs["train"], "npz")
        ev = _upload(client, "datasets", inputs["eval"], "npz")
        specs = [{"model": model["id"], "task": "image-classification",
                  "data": {"train": train["id"], "eval": ev["id"]},
                  "steps": [{"type": "finetune", "epochs": 40, "batch_size": 16}], "evaluate": latency}]
        specs += [{"model": model["id"], "task": "image-classification", "data": {"eval": ev["id"]},
                   "steps": [{"type": "quantize", "mode": "dynamic"}], "evaluate": latency}] * 2
        ids = []
        for spec in specs:
            r = client.post("/v1/jobs", json=spec)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until the finetune trains (a few epochs in)
            job = client.get(f"/v1/jobs/{ids[0]}").json()
            if (job["progress"] or {}).get("epoch") or job["status"] not in ("queued", "running"):
                break
            time.sleep(0.1)
        assert job["status"] == "running", job  # the outage hits a running job, not a finished one
        _outage(pg)
        done = [svc.wait_job(client, job_id, timeout=180) for job_id in ids]
    assert [d["status"] for d in done] == ["succeeded"] * 3, (done, svc.logs("worker.log"))
    for job in done:
        _exactly_once(pg, job)
    # Every epoch's result was recorded once, and the trained model is as good as without the outage.
    epochs = [d["epoch"] for (d,) in _rows(pg, "SELECT data FROM job_events WHERE job_id = %s AND kind = 'progress'"
                                               " ORDER BY id", ids[0]) if d.get("epoch") is not None]
    assert epochs[-1] == 40 and len(set(epochs)) == 40, epochs
    assert done[0]["result"]["report"]["output"]["accuracy"] >= 0.9
    _assert_nothing_left_behind(svc, pg)


class _SlowBody:
    """An upload body sent in chunks with pauses; ``halfway`` is set once half the bytes are out."""

    def __init__(self, data: bytes, chunks: int = 40, pause_s: float = 0.1) -> None:
        self.data, self.chunks, self.pause_s = data, chunks, pause_s
        self.halfway = threading.Event()
        self.sent = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        step = -(-len(self.data) // self.chunks)
        for i in range(0, len(self.data), step):
            if i >= len(self.data) // 2:
                self.halfway.set()
            yield self.data[i:i + step]
            time.sleep(self.pause_s)
        self.sent.set()


def _slow_upload(svc: LiveService, path: Path, body: _SlowBody, out: dict[str, httpx.Response]) -> threading.Thread:
    def send() -> None:
        with httpx.Client(base_url=svc.url, timeout=60) as client:
            out["r"] = client.put("/v1/datasets", params={"name": "slow", "format": "npz"}, content=iter(body))

    t = threading.Thread(target=send)
    t.start()
    return t


def _records(pg: PgServer, sha256: str) -> int:
    return int(_rows(pg, "SELECT count(*) FROM datasets WHERE sha256 = %s", sha256)[0][0])


@pytest.mark.parametrize("when", ["mid_stream", "as_the_body_ends"])
def test_postgres_restart_while_an_upload_streams(
    svc: LiveService, pg: PgServer, inputs: dict[str, Path], when: str
) -> None:
    import hashlib

    # Different bytes per case (a new record each time): the pixels shifted by a per-case constant.
    path = inputs["big"].with_name(f"big-{when}.npz")
    with np.load(inputs["big"]) as z:
        arrays = dict(z)
    first = next(k for k in arrays if k != "labels")
    arrays[first] = arrays[first] + np.float32(len(when) / 1000)
    np.savez(path, **arrays)
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    body, out = _SlowBody(data), dict[str, httpx.Response]()
    t = _slow_upload(svc, path, body, out)
    if when == "mid_stream":
        assert body.halfway.wait(30)
        _outage(pg, 1.0)  # back before the body ends: the upload goes through
    else:
        assert body.halfway.wait(30)
        pg.stop()  # down when the body ends and stays down past the API's retries
        assert body.sent.wait(30)
        t.join(60)
        pg.start()
    t.join(60)
    r = out["r"]
    if r.status_code == 503:
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == "database_unavailable" and "retry-after" in r.headers, r.text
        assert _records(pg, sha) == 0 and sha not in _blob_files(svc)
    else:
        assert r.status_code == 201, r.text
        assert r.json()["sha256"] == sha and _records(pg, sha) == 1
    assert r.status_code == (201 if when == "mid_stream" else 503), r.text
    _assert_nothing_left_behind(svc, pg)
    # The next upload of the same bytes works and leaves exactly one record.
    with httpx.Client(base_url=svc.url, timeout=60) as client:
        again = client.put("/v1/datasets", params={"name": "again", "format": "npz"}, content=data)
    assert again.status_code in (200, 201), again.text
    assert again.json()["sha256"] == sha and _records(pg, sha) == 1
    _assert_nothing_left_behind(svc, pg)


def test_a_job_submitted_while_postgres_is_down(svc: LiveService, pg: PgServer, inputs: dict[str, Path]) -> None:
    """The submit is a 503 that records and enqueues nothing; the same submit afterwards runs once."""
    import redis

    with httpx.Client(base_url=svc.url, timeout=30) as client:
        model = _upload(client, "models", inputs["model"], "onnx")
        ev = _upload(client, "datasets", inputs["eval"], "npz")
        spec = {"model": model["id"], "task": "image-classification", "data": {"eval": ev["id"]},
                "steps": [{"type": "quantize", "mode": "dynamic"}], "evaluate": {"latency": {"runs": 5, "warmup": 1}}}
        before = int(_rows(pg, "SELECT count(*) FROM jobs")[0][0])
        pg.stop()
        try:
            r = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "submit-during-outage"})
        finally:
            pg.start()
        assert r.status_code == 503, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == "database_unavailable" and r.headers["retry-after"]
        queues = [svc.env["MODELPRESS_CPU_QUEUE"], svc.env["MODELPRESS_GPU_QUEUE"]]
        broker = redis.Redis.from_url(svc.env["MODELPRESS_BROKER_URL"])
        assert sum(broker.llen(q) for q in queues) == 0  # nothing was enqueued for the refused submit
        assert int(_rows(pg, "SELECT count(*) FROM jobs")[0][0]) == before
        r = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "submit-during-outage"})
        assert r.status_code == 202, r.text
        done = svc.wait_job(client, r.json()["id"])
    assert done["status"] == "succeeded", (done, svc.logs("worker.log"))
    _exactly_once(pg, done)
    assert int(_rows(pg, "SELECT count(*) FROM jobs")[0][0]) == before + 1
    assert sum(broker.llen(q) for q in queues) == 0
    broker.close()
    _assert_nothing_left_behind(svc, pg)
