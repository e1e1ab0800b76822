"""Prometheus metrics: requests and latency by route template and status; jobs by status at scrape time."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.db import session_scope
from models.tables import STATUSES, Job

log = logging.getLogger("modelpress.api.metrics")


class JobsByStatus(Collector):
    """``modelpress_jobs{status}``: how many jobs are in each status, counted when scraped."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("modelpress_jobs", "Jobs by status", labels=["status"])
        try:
            with session_scope() as session:
                counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        except Exception as exc:
            log.warning("jobs gauge: database unavailable: %s", exc)
            return
        for status in STATUSES:
            gauge.add_metric([status], float(counts.get(status, 0)))
        yield gauge


class Metrics:
    """One registry per app (so several apps in one process do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "modelpress_http_requests_total",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "modelpress_http_request_duration_seconds",
            "HTTP request latency by method and route template",
            ["method", "route"],
            registry=self.registry,
        )
        self.registry.register(JobsByStatus())

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def route_template(scope: Scope) -> str:
    """The matched route's path template (``/v1/jobs/{job_id}``), or ``unmatched`` (bounded cardinality)."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


class MetricsMiddleware:
    """Pure ASGI middleware (safe for streaming responses) that counts and times each HTTP request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = route_template(scope)
            method = str(scope.get("method", ""))
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)
