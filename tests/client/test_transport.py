"""``client.transport``: the one retry policy (counted attempts and delays) and the session against a real API."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator

import httpx
import pytest

from client.errors import APIUnavailable, ConnectionFailed, ResourceNotFound
from client.transport import Reconnect, RetryPolicy, Transport
from tests.e2e.harness import LiveService, free_port

PROBLEM_503 = {"type": "about:blank", "title": "Service Unavailable", "status": 503,
               "detail": "the broker is down", "code": "service_unavailable"}
Answer = int | type[httpx.TransportError]


def scripted(answers: list[Answer], retry_after: str | None = None) -> tuple[httpx.MockTransport, list[bytes]]:
    """A transport answering each request with the next status (or raising the next error); the last repeats.

    Returns it and the bodies of the requests it received, one per attempt.
    """
    bodies: list[bytes] = []

    def handle(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        answer = answers[min(len(bodies), len(answers)) - 1]
        if not isinstance(answer, int):
            raise answer("scripted failure", request=request)
        if answer == 503:
            headers = {"content-type": "application/problem+json"}
            if retry_after is not None:
                headers["Retry-After"] = retry_after
            return httpx.Response(503, json=PROBLEM_503, headers=headers)
        return httpx.Response(answer, json={"ok": True})

    return httpx.MockTransport(handle), bodies


def session(mock: httpx.BaseTransport | None, delays: list[float], retries: int = 4, url: str = "http://mp.test",
            ) -> Transport:
    """A Transport whose retry policy records its delays instead of sleeping."""
    return Transport(url, policy=RetryPolicy(retries, backoff=0.1, sleep=delays.append), transport=mock)


def test_503_is_retried_with_exponential_backoff_and_jitter_then_succeeds() -> None:
    mock, bodies = scripted([503, 503, 503, 200])
    delays: list[float] = []
    assert session(mock, delays).get_json("/v1/jobs") == {"ok": True}
    assert len(bodies) == 4
    # Attempt k waits between half and all of backoff * 2**k.
    for k, d in enumerate(delays):
        assert 0.1 * 2**k / 2 <= d <= 0.1 * 2**k
    assert len(delays) == 3


def test_retry_after_is_honoured_in_seconds_and_as_a_date_and_capped() -> None:
    delays: list[float] = []
    mock, bodies = scripted([503, 200], retry_after="3")
    session(mock, delays).get_json("/x")
    assert delays == [3.0] and len(bodies) == 2

    delays.clear()
    when = email.utils.formatdate(time.time() + 5, usegmt=True)
    mock, _ = scripted([503, 200], retry_after=when)
    session(mock, delays).get_json("/x")
    assert 3.0 <= delays[0] <= 5.0

    delays.clear()
    mock, _ = scripted([503, 200], retry_after="3600")
    session(mock, delays).get_json("/x")
    assert delays == [30.0]  # max_retry_after


def test_retries_run_out_with_the_servers_problem() -> None:
    mock, bodies = scripted([503])
    delays: list[float] = []
    with pytest.raises(APIUnavailable) as err:
        session(mock, delays, retries=2).get_json("/x")
    assert len(bodies) == 3 and len(delays) == 2
    assert err.value.status == 503 and err.value.code == "service_unavailable" and "broker" in err.value.detail


def test_a_post_is_retried_only_when_the_caller_says_it_is_safe() -> None:
    delays: list[float] = []
    mock, bodies = scripted([503, 201])
    with pytest.raises(APIUnavailable):
        session(mock, delays).send("POST", "/v1/jobs", json_body={"a": 1})
    assert len(bodies) == 1 and delays == []

    mock, bodies = scripted([503, 201])
    assert session(mock, delays).send("POST", "/v1/jobs", json_body={"a": 1}, retry=True).status_code == 201
    assert bodies == [b'{"a":1}', b'{"a":1}']


def test_a_streamed_body_is_sent_whole_again_on_each_attempt() -> None:
    delays: list[float] = []
    mock, bodies = scripted([httpx.ConnectError, 503, 200])

    def body() -> Iterator[bytes]:
        yield from (b"abc", b"def")

    assert session(mock, delays).send("PUT", "/v1/models", content=body).status_code == 200
    assert bodies == [b"abcdef"] * 3 and len(delays) == 2


def test_connection_errors_are_retried_then_reported() -> None:
    delays: list[float] = []
    mock, bodies = scripted([httpx.ConnectError, httpx.ReadError, 200])
    assert session(mock, delays).get_json("/x") == {"ok": True}
    assert len(bodies) == 3 and len(delays) == 2

    port = free_port()  # nobody listens there: a real refused connection
    delays.clear()
    t = session(None, delays, retries=3, url=f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectionFailed, match=f"cannot reach http://127.0.0.1:{port}"):
        t.get_json("/healthz")
    assert len(delays) == 3
    t.close()


def test_a_stream_that_makes_progress_gets_its_budget_back() -> None:
    delays: list[float] = []
    policy = RetryPolicy(retries=2, backoff=0.1, sleep=delays.append)
    opened = 0

    def stream() -> Iterator[int]:
        nonlocal opened
        opened += 1
        yield opened
        if opened < 6:
            raise httpx.ReadError("dropped")

    # Five drops, more than the two retries, but each connection yielded something first.
    assert list(policy.iterate(stream, "stream")) == [1, 2, 3, 4, 5, 6]
    assert len(delays) == 5 and all(0.05 <= d <= 0.1 for d in delays)

    def stuck() -> Iterator[int]:
        raise Reconnect("ended early")
        yield 0

    delays.clear()
    with pytest.raises(ConnectionFailed, match="stuck stream"):
        list(policy.iterate(stuck, "stuck stream"))
    assert len(delays) == 2


def test_against_the_api_json_pages_and_problems(api_service: LiveService, uploaded: dict[str, str]) -> None:
    delays: list[float] = []
    t = session(None, delays, url=api_service.url)
    try:
        assert t.get_json("/healthz")
        # One model and one dataset exist: one page per item with limit=1, cursors followed to the end.
        assert [m["id"] for m in t.paginate("/v1/models", limit=1)] == [uploaded["model"]]
        assert [d["id"] for d in t.paginate("/v1/datasets", {"after": None}, limit=1)] == [uploaded["data"]]
        with pytest.raises(ResourceNotFound) as err:
            t.get_json("/v1/models/mdl_missing")
        assert err.value.status == 404 and err.value.code == "not_found" and err.value.body["instance"]
        assert delays == []  # a 404 is not retried
    finally:
        t.close()
