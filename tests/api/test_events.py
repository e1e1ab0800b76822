"""Job events: pages in id order, and the SSE stream (framing, resume with Last-Event-ID, closing)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from api.services import events as event_service
from tests.api import builders


def parse_sse(text: str) -> list[dict[str, Any]]:
    """SSE messages as dicts with id, event and parsed data (comments and retry-only messages skipped)."""
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if not line or line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            fields[key] = value
        if "data" in fields and "id" in fields:  # control messages (``reconnect``) carry no id
            out.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
    return out


@pytest.fixture(autouse=True)
def fast_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_service, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(event_service, "BATCH", 4)  # several batches per stream


def test_event_pages(client: TestClient) -> None:
    job_id = builders.insert_job(builders.insert_model())
    ids = builders.add_events(job_id, 5)
    page = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 4}).json()
    assert [e["kind"] for e in page["data"]] == ["status", "log", "log", "log"]
    assert page["next_cursor"] == str(ids[2])
    rest = client.get(f"/v1/jobs/{job_id}/events", params={"after": page["next_cursor"]}).json()
    assert [e["id"] for e in rest["data"]] == ids[3:] and rest["next_cursor"] is None
    assert rest["data"][0]["data"] == {"i": 3} and rest["data"][0]["job_id"] == job_id
    assert client.get(f"/v1/jobs/{job_id}/events", params={"after": "x"}).status_code == 422
    assert client.get("/v1/jobs/job_nope/events").status_code == 404


def test_stream_sends_all_then_closes_and_resumes(client: TestClient) -> None:
    job_id = builders.insert_job(builders.insert_model(), status="running")
    builders.add_events(job_id, 9)
    builders.set_status(job_id, "succeeded")
    r = client.get(f"/v1/jobs/{job_id}/events/stream")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.startswith("retry: ")
    events = parse_sse(r.text)
    assert len(events) == 11 and events[-1]["data"]["data"] == {"status": "succeeded"}
    assert [e["event"] for e in events[:2]] == ["status", "log"]
    assert all(e["id"] == e["data"]["id"] for e in events)
    # A client that read the first 4 and disconnected resumes with Last-Event-ID: nothing lost or repeated.
    resumed = parse_sse(client.get(f"/v1/jobs/{job_id}/events/stream",
                                   headers={"Last-Event-ID": str(events[3]["id"])}).text)
    assert [e["id"] for e in events[:4] + resumed] == [e["id"] for e in events]
    via_query = parse_sse(client.get(f"/v1/jobs/{job_id}/events/stream", params={"after": events[-2]["id"]}).text)
    assert [e["id"] for e in via_query] == [events[-1]["id"]]
    bad = client.get(f"/v1/jobs/{job_id}/events/stream", headers={"Last-Event-ID": "abc"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "Last-Event-ID"
    assert client.get("/v1/jobs/job_nope/events/stream").status_code == 404


@pytest.fixture
def live_url(pg_env: str) -> Iterator[str]:
    """The app served by a real uvicorn in a thread (true streaming and disconnects)."""
    from api.main import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


def _read(client: httpx.Client, url: str, headers: dict[str, str], stop_after: int | None) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    buf = ""
    with client.stream("GET", url, headers=headers) as r:
        assert r.status_code == 200
        for text in r.iter_text():
            buf += text
            while "\n\n" in buf:
                block, buf = buf.split("\n\n", 1)
                got += parse_sse(block + "\n\n")
                if stop_after is not None and len(got) >= stop_after:
                    return got  # leaving the block closes the connection mid-stream
    return got


def test_disconnect_mid_stream_and_resume_over_a_real_socket(live_url: str) -> None:
    job_id = builders.insert_job(builders.insert_model(), status="running")
    builders.add_events(job_id, 5)
    url = f"{live_url}/v1/jobs/{job_id}/events/stream"
    with httpx.Client(timeout=10) as client:
        first = _read(client, url, {}, stop_after=3)
        # While the client is away the job goes on and finishes.
        builders.add_events(job_id, 6, kind="progress")
        builders.set_status(job_id, "succeeded")
        rest = _read(client, url, {"Last-Event-ID": str(first[-1]["id"])}, stop_after=None)
        everything = client.get(f"{live_url}/v1/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    ids = [e["id"] for e in first + rest]
    assert len(ids) == len(set(ids)) == 13
    assert ids == [e["id"] for e in everything]
    assert rest[-1]["data"]["data"] == {"status": "succeeded"}


def test_stream_follows_a_running_job_and_sends_keepalives(live_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_service, "KEEPALIVE_SECONDS", 0.2)
    job_id = builders.insert_job(builders.insert_model(), status="running")

    def finish_later() -> None:
        time.sleep(0.6)
        builders.add_events(job_id, 2)
        builders.set_status(job_id, "failed")

    worker = threading.Thread(target=finish_later)
    worker.start()
    with httpx.Client(timeout=10) as client:
        raw = client.get(f"{live_url}/v1/jobs/{job_id}/events/stream").text
    worker.join()
    assert ": keep-alive" in raw
    assert [e["event"] for e in parse_sse(raw)] == ["status", "log", "log", "status"]


@pytest.mark.parametrize("value", ["99999999999999999999", "9" * 5000, "²", "9223372036854775808", "-1", "٣"])
def test_out_of_range_event_ids_are_4xx_problems(client: TestClient, value: str) -> None:
    job_id = builders.insert_job(builders.insert_model())
    builders.add_events(job_id, 1)
    r = client.get(f"/v1/jobs/{job_id}/events", params={"after": value})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "after", r.text[:300]
    if value.isascii():
        r = client.get(f"/v1/jobs/{job_id}/events/stream", headers={"Last-Event-ID": value})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "Last-Event-ID", r.text[:300]
        assert r.headers["content-type"].startswith("application/problem+json")
    ok = client.get(f"/v1/jobs/{job_id}/events", params={"after": "9223372036854775807"})
    assert ok.status_code == 200 and ok.json()["data"] == []


def _limit_streams(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    from models.settings import get_settings

    for key, value in env.items():
        monkeypatch.setenv(f"MODELPRESS_{key.upper()}", value)
    get_settings.cache_clear()


def test_stream_ends_at_its_lifetime_and_resumes(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    _limit_streams(monkeypatch, stream_max_s="0.4")
    job_id = builders.insert_job(builders.insert_model(), status="running")  # never finishes here
    ids = builders.add_events(job_id, 2)
    started = time.monotonic()
    r = client.get(f"/v1/jobs/{job_id}/events/stream")
    took = time.monotonic() - started
    assert r.status_code == 200 and 0.4 <= took < 5
    assert r.text.rstrip().splitlines()[-2] == "event: reconnect"
    control = json.loads(r.text.rstrip().splitlines()[-1].removeprefix("data: "))
    assert control["reason"] == "lifetime" and control["max_s"] == 0.4
    got = parse_sse(r.text)
    assert [e["id"] for e in got][-2:] == ids  # the control message has no id: Last-Event-ID stays on the last event
    more = builders.add_events(job_id, 1)
    resumed = parse_sse(client.get(f"/v1/jobs/{job_id}/events/stream", headers={"Last-Event-ID": str(ids[-1])}).text)
    assert [e["id"] for e in resumed] == more


def test_open_streams_per_owner_are_capped(live_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _limit_streams(monkeypatch, stream_max_per_owner="2")
    job_id = builders.insert_job(builders.insert_model(), status="running")
    url = f"{live_url}/v1/jobs/{job_id}/events/stream"
    with httpx.Client(timeout=10) as client:
        first = client.send(client.build_request("GET", url), stream=True)
        second = client.send(client.build_request("GET", url), stream=True)
        assert first.status_code == second.status_code == 200
        over = client.get(url)
        assert over.status_code == 429 and over.headers["content-type"].startswith("application/problem+json")
        assert over.json()["code"] == "too_many_streams" and over.headers["retry-after"] == "5"
        assert event_service.SLOTS.open_count("local") == 2
        first.close()  # a disconnect gives the slot back (at the stream's next poll)
        deadline = time.monotonic() + 5
        while event_service.SLOTS.open_count("local") > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        again = client.send(client.build_request("GET", url), stream=True)
        assert again.status_code == 200
        again.close()
        second.close()
    deadline = time.monotonic() + 5
    while event_service.SLOTS.open_count("local") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert event_service.SLOTS.open_count("local") == 0


def test_unstarted_stream_body_gives_its_slot_back(pg_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from api.errors import ProblemError

    _limit_streams(monkeypatch, stream_max_per_owner="1")
    body = event_service.open_stream("nobody", "job_x", 0)  # the route made it; the client left before it started
    with pytest.raises(ProblemError) as exc:
        event_service.open_stream("nobody", "job_x", 0)
    assert exc.value.status == 429 and exc.value.code == "too_many_streams"
    del body
    gc.collect()
    assert event_service.SLOTS.open_count("nobody") == 0
    event_service.open_stream("nobody", "job_x", 0)  # a slot is free again


def test_sdk_follow_reopens_after_lifetime_ends(live_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from client import Client

    _limit_streams(monkeypatch, stream_max_s="0.3")
    job_id = builders.insert_job(builders.insert_model(), status="running")

    def finish_later() -> None:
        for _ in range(4):  # quiet spells longer than the lifetime, with events between them
            time.sleep(0.5)
            builders.add_events(job_id, 1, kind="progress")
        builders.set_status(job_id, "succeeded")

    worker = threading.Thread(target=finish_later)
    worker.start()
    with Client(live_url) as mp:
        events = list(mp.job(job_id).events(follow=True))
    worker.join()
    kinds = [e.kind for e in events]
    assert kinds == ["status", "progress", "progress", "progress", "progress", "status"]
    assert len({e.id for e in events}) == len(events)


def test_revoking_its_key_ends_an_open_stream(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from api.services import keys
    from models.db import session_scope
    from tests.api.tenants import make_key

    _limit_streams(monkeypatch, stream_max_s="8")
    key_id, key = make_key("local")
    job_id = builders.insert_job(builders.insert_model(), status="running")  # never finishes here
    ids = builders.add_events(job_id, 2)

    def revoke() -> None:
        with session_scope() as s:
            keys.revoke_key(s, key_id)

    timer = threading.Timer(0.5, revoke)
    started = time.monotonic()
    timer.start()
    r = client.get(f"/v1/jobs/{job_id}/events/stream", headers={"Authorization": f"Bearer {key}"})
    took = time.monotonic() - started
    timer.join()
    assert r.status_code == 200 and 0.5 <= took < 3  # not the stream's 8 s lifetime
    lines = r.text.rstrip().splitlines()
    assert lines[-2] == "event: revoked" and json.loads(lines[-1].removeprefix("data: ")) == {"reason": "key_revoked"}
    assert [e["id"] for e in parse_sse(r.text)][-2:] == ids
    assert client.get(f"/v1/jobs/{job_id}/events/stream", headers={"Authorization": f"Bearer {key}"}).status_code == 401
