"""Shared benchmark helpers: timers, percentiles, JSON output, temporary PostgreSQL databases, services."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
if str(ROOT) not in sys.path:  # tests.e2e.harness is not an installed package
    sys.path.insert(0, str(ROOT))

PG_ADMIN_DSN = os.environ.get("MODELPRESS_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MODELPRESS_BENCH_REDIS", "redis://127.0.0.1:6379/0")
JSON_PREFIX = "BENCH_JSON "


def new_run_id() -> str:
    """A short id that keeps this run's databases, queues and folders apart from everyone else's."""
    return f"bench{uuid.uuid4().hex[:8]}"


# --- timing and statistics -------------------------------------------------------------------------


@dataclass
class Timer:
    """Wall time of a ``with`` block in seconds (``perf_counter``)."""

    elapsed: float = 0.0
    _start: float = field(default=0.0, repr=False)

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self._start


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else math.nan


def ratio(num: float, den: float) -> float:
    """``num / den``; NaN when the denominator is zero or missing."""
    return num / den if den else math.nan


def fmt_ratio(value: float, goal: float | None = None, *, higher_is_better: bool = True) -> str:
    """``0.73x`` plus ``(goal >= 0.5: met)`` when a goal is given."""
    text = f"{value:.2f}x"
    if goal is not None:
        met = value >= goal if higher_is_better else value <= goal
        text += f" (goal {'>=' if higher_is_better else '<='} {goal:g}: {'met' if met else 'MISSED'})"
    return text


def goal_met(value: float, goal: float, *, higher_is_better: bool = True) -> bool:
    """Whether ``value`` reaches ``goal`` (NaN never does)."""
    if math.isnan(value):
        return False
    return value >= goal if higher_is_better else value <= goal


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 6)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def emit(name: str, summary: str, figures: dict[str, Any]) -> None:
    """Print the one-line summary, then ``BENCH_JSON {"bench": name, ...}`` (NaN becomes null)."""
    print(f"[{name}] {summary}", flush=True)
    print(JSON_PREFIX + json.dumps({"bench": name, **_json_safe(figures)}, sort_keys=True), flush=True)


def log(message: str) -> None:
    """Progress to stderr, so stdout holds only the summary and the JSON line."""
    print(f"  .. {message}", file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    """CPU count and load average at the time of the run (the figures depend on both)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {"cpus": os.cpu_count(), "loadavg_1m": load[0], "python": sys.version.split()[0]}


# --- RSS sampling ----------------------------------------------------------------------------------


class RssSampler:
    """Samples a process's resident set size (plus its children's) every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        """Current RSS in bytes of the process and its descendants."""
        import psutil

        total = self.proc.memory_info().rss
        for child in self.proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return int(total)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.samples.append((time.perf_counter(), self.rss()))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, since: float = 0.0) -> int:
        """Highest sample taken at or after ``since`` (a perf_counter value)."""
        return max((rss for t, rss in self.samples if t >= since), default=0)


MIB = 1024 * 1024


# --- databases and services ------------------------------------------------------------------------


def _sqlalchemy_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+psycopg://", 1)


@contextlib.contextmanager
def temp_pg_database(run_id: str) -> Iterator[str]:
    """Create a fresh PostgreSQL database, yield its SQLAlchemy URL, drop it afterwards (even on error)."""
    import psycopg

    name = f"mp_{run_id}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _sqlalchemy_url(f"{PG_ADMIN_DSN.rpartition('/')[0]}/{name}")
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _drop_redis_queues(env: dict[str, str]) -> None:
    """Delete the Redis keys of this run's own queues (messages a benchmark left queued)."""
    import redis

    queues = [env["MODELPRESS_CPU_QUEUE"], env["MODELPRESS_GPU_QUEUE"]]
    client = redis.Redis.from_url(env["MODELPRESS_BROKER_URL"])
    try:
        keys = [k for q in queues for k in (q, f"_kombu.binding.{q}", f"_kombu.binding_permanent.{q}",
                                            f"{q}\x06\x163", f"{q}\x06\x166", f"{q}\x06\x169")]
        client.delete(*keys)
    finally:
        client.close()


@contextlib.contextmanager
def bench_home(run_id: str, base: Path | None = None, keep: bool = False) -> Iterator[Path]:
    """A fresh MODELPRESS_HOME folder (under ``base`` or the system temp dir), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=f"modelpress-{run_id}-", dir=base))
    try:
        yield root
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def service(
    kind: str, run_id: str, *, worker: bool, home_base: Path | None = None, **overrides: str
) -> Iterator[Any]:
    """A live API (and worker) from tests.e2e.harness: ``kind`` is ``distributed`` (PostgreSQL + Redis)
    or ``embedded`` (SQLite database and SQLite broker under a fresh home)."""
    from tests.e2e.harness import live_service, service_env

    with bench_home(run_id, home_base) as home, contextlib.ExitStack() as stack:
        if kind == "distributed":
            db_url = stack.enter_context(temp_pg_database(run_id))
            env = service_env(home, run_id, database_url=db_url, broker_url=REDIS_URL, **overrides)
            stack.callback(_drop_redis_queues, env)
        elif kind == "embedded":
            env = service_env(home, run_id, **overrides)
        else:
            raise ValueError(f"unknown service kind {kind!r}")
        svc = stack.enter_context(live_service(home, env, worker=worker))
        yield svc


def upload(client: Any, kind: str, path: Path, fmt: str, name: str | None = None) -> dict[str, Any]:
    """PUT a file to ``/v1/{kind}`` as a streamed body; return the record (raises on an error status)."""

    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as fh:
            while chunk := fh.read(MIB):
                yield chunk

    r = client.put(f"/v1/{kind}", params={"name": name or path.name, "format": fmt}, content=chunks())
    if r.status_code not in (200, 201):
        raise RuntimeError(f"upload of {path.name} failed: {r.status_code} {r.text[:500]}")
    result: dict[str, Any] = r.json()
    return result


def submit_job(client: Any, spec: dict[str, Any]) -> str:
    """POST a job spec to ``/v1/jobs``; the new job's id (raises unless the answer is 202).

    Benchmarks measure the work, so their jobs skip the stage cache unless the spec says otherwise."""
    r = client.post("/v1/jobs", json={"cache": False, **spec})
    if r.status_code != 202:
        raise RuntimeError(f"POST /v1/jobs: {r.status_code} {r.text[:500]}")
    job_id: str = r.json()["id"]
    return job_id


def run_cli(main: Callable[[list[str] | None], dict[str, Any]]) -> None:
    """Entry point wrapper for ``python -m bench.<name>``."""
    main(None)
