"""Cursor pages: limit rows past the cursor in id order, a cursor only while rows remain, 422 for bad limits."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from api.errors import ProblemError
from api.services.pagination import MAX_LIMIT, check_limit, paginate
from models.db import session_scope
from models.tables import JobEvent, Model
from tests.api import builders


def _walk(query_owner: str, limit: int) -> tuple[list[list[str]], list[str | None]]:
    pages: list[list[str]] = []
    cursors: list[str | None] = []
    after: str | None = None
    with session_scope() as s:
        while True:
            rows, after = paginate(s, select(Model).where(Model.owner == query_owner), Model.id, after, limit)
            pages.append([r.id for r in rows])
            cursors.append(after)
            if after is None:
                return pages, cursors


def test_newest_first_pages_cover_every_row_once(pg_env: str) -> None:
    ids = sorted((builders.insert_model(owner="alice") for _ in range(5)), reverse=True)
    builders.insert_model(owner="bob")
    pages, cursors = _walk("alice", 2)
    assert pages == [ids[0:2], ids[2:4], ids[4:5]]
    assert cursors == [ids[1], ids[3], None]


def test_a_full_last_page_has_no_cursor(pg_env: str) -> None:
    ids = sorted((builders.insert_model() for _ in range(4)), reverse=True)
    pages, cursors = _walk("local", 2)
    assert pages == [ids[0:2], ids[2:4]] and cursors == [ids[1], None]


def test_oldest_first_with_integer_keys(pg_env: str) -> None:
    job_id = builders.insert_job(builders.insert_model())
    event_ids = _event_ids(job_id) + builders.add_events(job_id, 4)
    with session_scope() as s:
        query = select(JobEvent).where(JobEvent.job_id == job_id)
        rows, cursor = paginate(s, query, JobEvent.id, 0, 3, newest_first=False)
        assert [r.id for r in rows] == event_ids[:3] and cursor == event_ids[2]
        rows, cursor = paginate(s, query, JobEvent.id, cursor, 3, newest_first=False)
        assert [r.id for r in rows] == event_ids[3:] and cursor is None


def _event_ids(job_id: str) -> list[int]:
    with session_scope() as s:
        return list(s.scalars(select(JobEvent.id).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


@pytest.mark.parametrize("limit", [0, -1, MAX_LIMIT + 1])
def test_a_limit_out_of_range_is_422_naming_limit(limit: int) -> None:
    with pytest.raises(ProblemError) as caught:
        check_limit(limit)
    problem = caught.value
    assert problem.status == 422 and problem.code == "validation_error"
    assert problem.errors == [{"field": "limit", "message": f"must be between 1 and {MAX_LIMIT}"}]


def test_a_larger_maximum_admits_larger_pages() -> None:
    assert check_limit(MAX_LIMIT) == MAX_LIMIT
    assert check_limit(1000, maximum=1000) == 1000
    with pytest.raises(ProblemError, match="between 1 and 1000"):
        check_limit(1001, maximum=1000)
