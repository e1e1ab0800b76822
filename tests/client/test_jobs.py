"""``client.jobs.Job`` against a real API server: wait, events (paged and streamed), cancel, download."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from client import ChecksumMismatch, Client, JobFailed, JobWasCancelled, ResourceConflict, WaitTimeout
from models.tables import Job
from tests.client.conftest import add_events, insert_job, job_with_artifact, service_db, set_status
from tests.e2e.harness import LiveService, free_port


def test_download_verifies_sha256_and_detects_a_tampered_byte(
    api_service: LiveService, uploaded: dict[str, str], tmp_path: Path
) -> None:
    payload = bytes(range(256)) * 4096 + b"modelpress"
    job_id, blob_path = job_with_artifact(api_service, uploaded["model"], payload)
    with Client(api_service.url) as mp:
        job = mp.job(job_id)
        paths = job.download(tmp_path / "ok")
        assert [p.name for p in paths] == ["model.onnx"] and paths[0].read_bytes() == payload
        # Flip one byte of the stored blob (same size): the download must refuse it and leave nothing.
        data = bytearray(blob_path.read_bytes())
        data[1000] ^= 0xFF
        blob_path.chmod(0o644)
        blob_path.write_bytes(bytes(data))
        with pytest.raises(ChecksumMismatch) as err:
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
    with Client(api_service.url) as mp, pytest.raises(TimeoutError) as timed_out:
        mp.job(insert_job(api_service, uploaded["model"], status="running")).wait(timeout=0.5, poll=0.1)
    assert isinstance(timed_out.value, WaitTimeout)


def sse_ids(data: bytes) -> int:
    """How many SSE events start in a chunk of the stream."""
    return data.count(b"\nid:") + data.startswith(b"id:")


class DroppingProxy:
    """A TCP proxy that cuts the first connection once ``cut_after`` units (``count(chunk)``) went through."""

    def __init__(self, target_port: int, cut_after: int, count: Callable[[bytes], int] = sse_ids) -> None:
        self.target_port, self.cut_after, self.count = target_port, cut_after, count
        self.port = free_port()
        self.connections = 0
        self.requests: list[bytearray] = []  # what the client sent, per connection
        self.sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.requests.append(bytearray())
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            cut = self.cut_after if self.connections == 1 else None
            args = (client, upstream, None, self.requests[-1])
            threading.Thread(target=self._pipe, args=args, daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, cut, None), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, cut: int | None, record: bytearray | None) -> None:
        """Copy bytes; on the connection to cut, send half of the chunk that reaches ``cut`` and hang up."""
        sent = 0
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if record is not None:
                    record.extend(data)
                if cut is not None:
                    n = self.count(data)
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




def test_download_resumes_with_range_after_a_dropped_connection(
    api_service: LiveService, uploaded: dict[str, str], tmp_path: Path
) -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB
    job_id, _ = job_with_artifact(api_service, uploaded["model"], payload)
    proxy = DroppingProxy(api_service.port, cut_after=700_000, count=len)
    seen: list[int] = []
    try:
        with Client(f"http://127.0.0.1:{proxy.port}", backoff=0.05) as mp:
            paths = mp.job(job_id).download(tmp_path, on_progress=lambda done, total: seen.append(done))
    finally:
        proxy.close()
    assert paths[0].read_bytes() == payload
    assert proxy.connections == 2
    resumed = bytes(proxy.requests[1]).lower()
    assert b"range: bytes=" in resumed and b"if-range:" in resumed
    assert seen[-1] == len(payload) and 0 < min(seen) < 700_000  # progress went on from the cut, not from 0
    assert seen == sorted(seen)


def test_cancel_is_safe_to_repeat_and_wait_raises_for_a_cancelled_job(
    api_service: LiveService, uploaded: dict[str, str]
) -> None:
    job_id = insert_job(api_service, uploaded["model"], status="running")
    with Client(api_service.url) as mp:
        job = mp.job(job_id).cancel()
        assert job.status == "cancelling"
        assert job.cancel().status == "cancelling"
        set_status(api_service, job_id, "cancelled")
        with pytest.raises(JobWasCancelled) as cancelled:
            job.wait(timeout=10, poll=0.1)
        assert cancelled.value.job.id == job_id and job.done
        with pytest.raises(ResourceConflict) as conflict:
            job.cancel()
        assert conflict.value.status == 409 and conflict.value.code == "job_terminal"
