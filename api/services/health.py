"""Readiness: the database answers, the broker accepts a connection, the blob store passes its check."""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from sqlalchemy import text

from models.db import get_engine
from models.settings import get_settings
from storage import get_store

log = logging.getLogger("modelpress.api.health")
CHECK_TIMEOUT = 5.0


def check_database() -> None:
    """``SELECT 1`` on the configured database."""
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


def check_broker() -> None:
    """Open (and close) a connection to the broker, one retry at most.

    kombu's SQLAlchemy transport connects lazily, so for the embedded ``sqla+`` broker the database
    behind it is queried directly.
    """
    from kombu import Connection

    url = get_settings().broker_url
    if url.startswith("sqla+"):
        from sqlalchemy import create_engine

        engine = create_engine(url[len("sqla+"):])
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        finally:
            engine.dispose()
        return
    with Connection(url, connect_timeout=2) as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def check_storage() -> None:
    """The configured blob store's own check (local: write and remove a temp file; S3: the bucket answers)."""
    get_store().check()


# /readyz is unauthenticated: a driver's error names hosts, ports and URLs, so these say only what is down
# (the reason goes to the log). The blob stores' own checks word their errors for the operator.
_OPAQUE = frozenset({"database", "broker"})

CHECKS: dict[str, Callable[[], None]] = {"database": check_database, "broker": check_broker, "storage": check_storage}


async def _run(name: str, check: Callable[[], None], results: dict[str, str]) -> None:
    try:
        with anyio.fail_after(CHECK_TIMEOUT):
            await anyio.to_thread.run_sync(check, abandon_on_cancel=True)
        results[name] = "ok"
    except TimeoutError:
        results[name] = f"no answer within {CHECK_TIMEOUT:.0f} s"
    except Exception as exc:
        log.warning("readiness check %s failed: %s: %s", name, type(exc).__name__, exc)
        if name in _OPAQUE:
            results[name] = f"{name} unreachable"
            return
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        results[name] = f"{type(exc).__name__}: {first}" if first else type(exc).__name__


async def readiness() -> dict[str, str]:
    """Each check's outcome (``ok`` or what went wrong), run concurrently."""
    results: dict[str, str] = {}
    async with anyio.create_task_group() as tg:
        for name, check in CHECKS.items():
            tg.start_soon(_run, name, check, results)
    return {name: results[name] for name in CHECKS}
