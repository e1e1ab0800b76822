"""Engine and sessions: SQLite (WAL, foreign keys) for embedded runs, PostgreSQL when distributed."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from models.settings import get_settings


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL mode, a busy timeout and enforced foreign keys.

    Both pools hold more connections than the API's thread pool (40) has threads, and a request that
    waits ``DB_POOL_TIMEOUT_S`` for one anyway is answered 503 ``overloaded`` (api/errors.py)."""
    pool_timeout = get_settings().db_pool_timeout_s
    if url.startswith("sqlite"):
        # SQLite connections are cheap file handles; the default pool (5 + 10) is smaller than the thread pool.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=20, max_overflow=30, pool_timeout=pool_timeout)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # Enough pooled connections for the API's thread pool (40), so bursts do not churn connections.
    # Pinged on checkout: after a PostgreSQL restart every pooled connection is dead, and without the ping
    # each one would fail a request (or a worker's final status write) before the pool noticed.
    return create_engine(url, pool_size=20, max_overflow=30, pool_recycle=1800, pool_pre_ping=True,
                         pool_timeout=pool_timeout)


_ENGINES: dict[str, Engine] = {}


def get_engine() -> Engine:
    """The process-wide engine for the configured database."""
    url = get_settings().database_url
    if url not in _ENGINES:
        _ENGINES[url] = make_engine(url)
    return _ENGINES[url]


def reset_engines(close: bool = True) -> None:
    """Dispose cached engines (tests, and in worker children after fork: ``close=False`` leaves the
    parent's pooled connections open for the parent instead of closing them from the child)."""
    for engine in _ENGINES.values():
        engine.dispose(close=close)
    _ENGINES.clear()


@contextmanager
def session_scope() -> Iterator[Session]:
    """A short transaction: commit on success, roll back on error, always close."""
    session = sessionmaker(bind=get_engine(), expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """True for a database error that a retry can cure: the server went away, restarted or refused a connection."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (OperationalError, InterfaceError))


def retry_transient(within_s: float = 60.0, *, first_delay_s: float = 0.2) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorate a function that runs whole transactions: rerun it on a transient DB error for up to ``within_s``.

    The function must be safe to rerun (each call opens its own ``session_scope``; its writes are guarded by
    conditions, so a commit whose acknowledgement was lost is not applied twice)."""

    def wrap(fn: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> T:
            deadline = time.monotonic() + within_s
            delay = first_delay_s
            while True:
                try:
                    return fn(*args, **kwargs)
                except Exception as exc:
                    if not is_transient(exc) or time.monotonic() + delay > deadline:
                        raise
                    log.warning("%s: database unavailable (%s); retrying in %.1f s",
                                fn.__qualname__, type(exc).__name__, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)

        return run

    return wrap
