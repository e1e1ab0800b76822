"""models.db: which database errors are transient, and the retry around whole transactions."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from models.db import is_transient, retry_transient
from tests.e2e.harness import free_port


def _refused() -> OperationalError:
    """The real error of connecting to a PostgreSQL port nobody listens on."""
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test")
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError("connecting to a closed port succeeded")


def test_a_refused_connection_is_transient_a_constraint_is_not(pg_url: str) -> None:
    assert is_transient(_refused())
    engine = create_engine(pg_url)
    with pytest.raises(IntegrityError) as caught, engine.begin() as conn:
        conn.execute(text("INSERT INTO models (id) VALUES (NULL)"))
    engine.dispose()
    assert not is_transient(caught.value)
    assert not is_transient(ValueError("x"))


def test_retry_reruns_on_transient_errors_until_it_works() -> None:
    calls = []
    error = _refused()

    @retry_transient(5.0, first_delay_s=0.01)
    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise error
        return "done"

    assert flaky() == "done" and len(calls) == 3


def test_retry_gives_up_after_its_window_and_never_retries_other_errors() -> None:
    calls = []
    error = _refused()

    @retry_transient(0.3, first_delay_s=0.05)
    def down() -> None:
        calls.append(1)
        raise error

    with pytest.raises(OperationalError):
        down()
    assert 3 <= len(calls) <= 6  # 0.05 + 0.1 + 0.2 s of waits fit in 0.3 s, then it gives up

    @retry_transient(5.0)
    def broken() -> None:
        calls.append(2)
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        broken()
    assert calls.count(2) == 1
