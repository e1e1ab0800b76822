"""The SDK against a real API server (uvicorn subprocess, PostgreSQL, Redis); no mocked HTTP."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from client import Client, IntegrityError, JobFailed, NotFound, ValidationError
from models.ids import new_id
from models.tables import Artifact, Job, JobEvent
from storage.local import LocalBlobStore
from tests.client.conftest import service_db, storage_root, tiny_npz, tiny_onnx
from tests.e2e.harness import LiveService, free_port


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sdk-assets")
    return {"model": tiny_onnx(d / "tiny.onnx"), "data": tiny_npz(d / "tiny.npz")}


@pytest.fixture(scope="module")
def uploaded(api_service: LiveService, assets: dict[str, Path]) -> dict[str, str]:
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
    with service_db(svc) as s:
        rows = [JobEvent(job_id=job_id, kind="log", message=m, data={"n": m}) for m in messages]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def set_status(svc: LiveService, job_id: str, status: str) -> None:
    with service_db(svc) as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.status = status


def test_upload_is_streamed_with_progress_and_deduplicated(api_service: LiveService, assets: dict[str, Path]) -> None:
    size = assets["model"].stat().st_size
    seen: list[tuple[int, int]] = []
    with Client(api_service.url) as mp:
        first = mp.upload_model(assets["model"], name="tiny", on_progress=lambda a, b: seen.append((a, b)))
        again = mp.upload_model(assets["model"], name="tiny-again")
        assert first.format == "onnx" and first.size_bytes == size
        assert again.id == first.id and again.sha256 == first.sha256
        assert seen[-1] == (size, size)
        assert first.id in [m.id for m in mp.models()]
        ds = mp.upload_dataset(assets["data"])
        assert ds.format == "npz" and ds.num_samples == 64
        assert ds.id in [d.id for d in mp.datasets()]


def test_typed_errors_from_problem_json(api_service: LiveService, uploaded: dict[str, str]) -> None:
    with Client(api_service.url) as mp:
        with pytest.raises(NotFound) as nf:
            mp.job("job_doesnotexist")
        assert nf.value.status == 404 and nf.value.code == "not_found"
        # Valid locally, rejected by the server: an unknown model id names the field.
        with pytest.raises(ValidationError) as bad:
            mp.submit({"model": "mdl_nope", "steps": [{"type": "quantize"}]})
        assert bad.value.status == 422 and "model" in bad.value.fields()
        # Caught locally before any request: a ratio out of range.
        with pytest.raises(ValidationError) as local:
            mp.submit({"model": uploaded["model"], "data": {"train": uploaded["data"]},
                       "steps": [{"type": "prune", "ratio": 1.5}]})
        assert local.value.fields() == ["steps.0.ratio"]


def test_jobs_iterate_lazily_across_pages_and_submit_is_idempotent(
    api_service: LiveService, uploaded: dict[str, str]
) -> None:
    spec = {"model": uploaded["model"], "data": {"eval": uploaded["data"]}, "steps": [{"type": "quantize"}]}
    requests: list[httpx.Request] = []
    with Client(api_service.url) as mp:
        ids = {mp.submit(spec).id for _ in range(7)}
        assert len(ids) == 7
        same = mp.submit(spec, idempotency_key="k-1").id
        assert mp.submit(spec, idempotency_key="k-1").id == same
        mp._http.event_hooks["request"].append(requests.append)
        pages = lambda: [r for r in requests if r.url.path == "/v1/jobs"]  # noqa: E731
        it = mp.jobs(limit=3)
        first = next(it)
        assert len(pages()) == 1 and first.status == "queued"
        listed = [first.id, *(j.id for j in it)]
        assert len(pages()) == 3  # 8 jobs, 3 per page
        assert len(listed) == len(set(listed)) == 8
        assert ids | {same} == set(listed)
        assert {j.id for j in mp.jobs(status="succeeded")} == set()


def _job_with_artifact(svc: LiveService, model_id: str, payload: bytes) -> tuple[str, Path]:
    blob = LocalBlobStore(storage_root(svc)).put([payload])
    job_id = insert_job(svc, model_id, status="succeeded", phase="done", result={"report": {"task": "generic"}})
    with service_db(svc) as s:
        s.add(Artifact(id=new_id("art"), owner="local", job_id=job_id, name="model.onnx", kind="model",
                       media_type="application/octet-stream", sha256=blob.sha256, size_bytes=blob.size_bytes,
                       storage_key=blob.key, meta={}))
    return job_id, LocalBlobStore(storage_root(svc)).path(blob.key)


def test_download_verifies_sha256_and_detects_a_tampered_byte(
    api_service: LiveService, uploaded: dict[str, str], tmp_path: Path
) -> None:
    payload = bytes(range(256)) * 4096 + b"modelpress"
    job_id, blob_path = _job_with_artifact(api_service, uploaded["model"], payload)
    with Client(api_service.url) as mp:
        job = mp.job(job_id)
        paths = job.download(tmp_path / "ok")
        assert [p.name for p in paths] == ["model.onnx"] and paths[0].read_bytes() == payload
        # Flip one byte of the stored blob (same size): the download must refuse it and leave nothing.
        data = bytearray(blob_path.read_bytes())
        data[1000] ^= 0xFF
        blob_path.chmod(0o644)
        blob_path.write_bytes(bytes(data))
        with pytest.raises(IntegrityError) as err:
            job.download(tmp_path / "bad")
        assert err.value.expected == job.artifacts[0].sha256 != err.value.actual
        assert list((tmp_path / "bad").iterdir()) == []


def test_wait_raises_job_failed_with_code_and_step(api_service: LiveService, uploaded: dict[str, str]) -> None:
    job_id = insert_job(api_service, uploaded["model"], status="running", phase="quantizing",
                        progress={"step": 1, "steps": 1, "percent": 50.0})
    seen: list[tuple[str, str]] = []

    def fail_later() -> None:
        time.sleep(1.0)
        with service_db(api_service) as s:
            job = s.get(Job, job_id)
            assert job is not None
            job.status, job.phase = "failed", "failed"
            job.error = {"code": "step_failed", "message": "quantizer exploded", "step": "quantize"}

    threading.Thread(target=fail_later).start()
    with Client(api_service.url) as mp, pytest.raises(JobFailed) as err:
        mp.job(job_id).wait(timeout=30, poll=0.1, on_progress=lambda j: seen.append((j.status, j.data.phase)))
    assert (err.value.code, err.value.message, err.value.step) == ("step_failed", "quantizer exploded", "quantize")
    assert seen[0] == ("running", "quantizing") and seen[-1] == ("failed", "failed")
    with Client(api_service.url) as mp, pytest.raises(TimeoutError):
        mp.job(insert_job(api_service, uploaded["model"], status="running")).wait(timeout=0.5, poll=0.1)


class DroppingProxy:
    """A TCP proxy that cuts the first connection once ``cut_after`` SSE events went through."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        self.target_port, self.cut_after = target_port, cut_after
        self.port = free_port()
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            cut = self.cut_after if self.connections == 1 else None
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, cut), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, cut: int | None) -> None:
        """Copy bytes; on the connection to cut, send half of the chunk holding event ``cut`` and hang up."""
        sent = 0
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if cut is not None:
                    n = data.count(b"\nid:") + data.startswith(b"id:")
                    if sent + n >= cut:
                        dst.sendall(data[: max(1, len(data) // 2)])
                        break
                    sent += n
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.sock.close()


def test_sse_follow_resumes_after_a_dropped_connection(api_service: LiveService, uploaded: dict[str, str]) -> None:
    job_id = insert_job(api_service, uploaded["model"], status="running")
    first = add_events(api_service, job_id, [f"e{i}" for i in range(5)])
    proxy = DroppingProxy(api_service.port, cut_after=3)
    later: list[int] = []

    def produce() -> None:
        time.sleep(1.5)
        later.extend(add_events(api_service, job_id, [f"late{i}" for i in range(4)]))
        time.sleep(1.0)
        later.extend(add_events(api_service, job_id, ["last"]))
        set_status(api_service, job_id, "succeeded")

    threading.Thread(target=produce).start()
    try:
        with Client(f"http://127.0.0.1:{proxy.port}", backoff=0.05) as mp:
            got = [ev for ev in mp.job(job_id).events(follow=True)]
    finally:
        proxy.close()
    assert proxy.connections >= 2, "the connection was never dropped"
    ids = [ev.id for ev in got]
    assert ids == first + later  # every event once, in order
    assert [ev.message for ev in got][-1] == "last"
    # Paging (no follow) sees the same events; a raw resume sends only what follows Last-Event-ID.
    with Client(api_service.url) as mp:
        assert [ev.id for ev in mp.job(job_id).events()] == ids
    r = httpx.get(f"{api_service.url}/v1/jobs/{job_id}/events/stream",
                  headers={"Last-Event-ID": str(ids[4])}, timeout=30)
    resumed = [int(line[3:].strip()) for line in r.text.splitlines() if line.startswith("id:")]
    assert resumed == ids[5:]


@pytest.mark.e2e
def test_submit_wait_progress_and_download_with_a_worker(
    live_worker_service: LiveService, assets: dict[str, Path], tmp_path: Path
) -> None:
    with Client(live_worker_service.url) as mp:
        model = mp.upload_model(assets["model"])
        data = mp.upload_dataset(assets["data"])
        job = mp.submit({"model": model.id, "data": {"eval": data.id}, "steps": [{"type": "quantize", "mode": "dynamic"}]})
        seen: list[tuple[str, str, float]] = []
        done = job.wait(timeout=300, poll=0.2,
                        on_progress=lambda j: seen.append((j.status, j.data.phase, j.data.progress.percent)))
        assert done.status == "succeeded"
        assert seen[0][0] in ("queued", "running") and seen[-1][0] == "succeeded"
        assert len(seen) >= 2
        events = list(done.events())
        assert events and events == list(mp.job(job.id).events(follow=True))
        paths = done.download(tmp_path / "out")
        assert any(p.suffix == ".onnx" for p in paths)
        for art, p in zip(done.artifacts, paths, strict=True):
            assert p.stat().st_size == art.size_bytes
        assert done.report.get("output", {}).get("size_bytes")
