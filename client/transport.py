"""HTTP under the SDK: one ``httpx.Client``, one retry policy, problem+json bodies as typed errors.

Retried: connection errors and 503 (waiting ``Retry-After`` when the server sends it, else an
exponential back-off with jitter), for requests that are safe to repeat: idempotent methods, and the
POSTs the caller marks safe (a submit with an idempotency key, a cancel). Streams (downloads, event
streams) resume after a drop under the same policy; progress on a stream gives it its budget back.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from client.errors import APIError, APIUnavailable, ConnectionFailed, error_for, parse_retry_after

DEFAULT_URL = "http://127.0.0.1:8000"
CHUNK = 1024 * 1024
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
T = TypeVar("T")


class Reconnect(Exception):
    """A stream ended before it was done: open it again (under the retry policy)."""


# What a retry may cure: the server was unreachable or dropped the connection, answered 503, or a
# stream ended early.
RETRYABLE: tuple[type[Exception], ...] = (httpx.TransportError, ConnectionFailed, APIUnavailable, Reconnect)


@dataclass
class RetryPolicy:
    """How often and how long to wait before repeating what failed for a reason a retry may cure."""

    retries: int = 4
    backoff: float = 0.25
    max_delay: float = 8.0
    max_retry_after: float = 30.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def delay(self, attempt: int, exc: BaseException | None = None) -> float:
        """Seconds before retry ``attempt`` (0-based): the server's ``Retry-After``, else back-off with jitter."""
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(float(retry_after), self.max_retry_after)
        return min(self.backoff * (2**attempt), self.max_delay) * (0.5 + random.random() / 2)

    def iterate(self, open_stream: Callable[[], Iterator[T]], what: str) -> Iterator[T]:
        """Yield from ``open_stream()``, opening it again after a retryable failure; each item resets the budget."""
        attempt = 0
        while True:
            try:
                for item in open_stream():
                    attempt = 0
                    yield item
                return
            except RETRYABLE as exc:
                if attempt >= self.retries:
                    if isinstance(exc, httpx.TransportError | Reconnect):
                        raise ConnectionFailed(f"{what}: {exc!r}") from exc
                    raise
                self.sleep(self.delay(attempt, exc))
                attempt += 1

    def call(self, once: Callable[[], T], what: str) -> T:
        """``once()``, repeated under this policy while it fails for a retryable reason."""
        for result in self.iterate(lambda: iter((once(),)), what):
            return result
        raise AssertionError("unreachable: iterate yields once or raises")


class Transport:
    """The SDK's HTTP session: base URL, API key, timeouts, the retry policy, and typed errors."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        policy: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("MODELPRESS_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("MODELPRESS_API_KEY") or None
        self.timeout = timeout
        self.policy = policy or RetryPolicy()
        headers = {"User-Agent": "modelpress-sdk/0.1", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self.http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def long_timeout(self, read: float) -> httpx.Timeout:
        """The client's timeouts, with a read timeout of at least ``read`` seconds (uploads, streams)."""
        return httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0), read=max(self.timeout, read))

    def send(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        content: Callable[[], Any] | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool | None = None,
        stream: bool = False,
        timeout: httpx.Timeout | None = None,
        follow_redirects: bool = False,
    ) -> httpx.Response:
        """Send a request (retried under the policy when it is safe to repeat); raise typed errors for 4xx/5xx.

        ``content`` is a factory, called once per attempt, so that a retried upload streams again.
        ``follow_redirects``: for downloads, which may be sent to a presigned URL (httpx drops the
        Authorization header when a redirect leaves the API's origin).
        """
        may_retry = method.upper() in IDEMPOTENT_METHODS if retry is None else retry
        clean = {k: v for k, v in (params or {}).items() if v is not None}

        def once() -> httpx.Response:
            request = self.http.build_request(
                method,
                url,
                params=clean or None,
                json=json_body,
                content=content() if content is not None else None,
                headers=dict(headers or {}),
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
            try:
                response = self.http.send(request, stream=stream, follow_redirects=follow_redirects)
            except httpx.TransportError as exc:
                raise ConnectionFailed(f"cannot reach {self.base_url}: {exc!r}") from exc
            if response.status_code >= 400:
                raise problem(response)
            return response

        return self.policy.call(once, f"{method} {url}") if may_retry else once()

    def get_json(self, url: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET ``url`` and decode its JSON body."""
        return self.send("GET", url, params=params).json()

    def paginate(self, url: str, params: Mapping[str, Any] | None = None, limit: int | None = None) -> Iterator[Any]:
        """Every item of a cursor-paginated list, fetching the next page only when needed."""
        query = dict(params or {})
        while True:
            page = self.get_json(url, {**query, "limit": limit})
            yield from page.get("data", [])
            query["after"] = page.get("next_cursor")
            if not query["after"]:
                return


def problem(response: httpx.Response) -> APIError:
    """The typed error for an HTTP error response (its problem+json body read and decoded)."""
    with contextlib.suppress(httpx.StreamError):
        response.read()
    response.close()
    body: Any = None
    with contextlib.suppress(ValueError):
        body = response.json()
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    return error_for(response.status_code, body, response.text[:500] if body is None else "", retry_after)


def json_or_none(response: httpx.Response) -> Any:
    """A response's decoded JSON body, or None when it has none."""
    with contextlib.suppress(ValueError):
        return response.json()
    return None
