"""as_utc: every timestamp leaves the tables aware and in UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from models.clock import as_utc


def test_naive_is_taken_as_utc_and_aware_is_converted() -> None:
    naive = datetime(2026, 12, 1, 22, 0, 0)
    assert as_utc(naive) == datetime(2026, 12, 1, 22, 0, 0, tzinfo=UTC)
    plus2 = datetime(2026, 12, 1, 23, 0, 0, tzinfo=timezone(timedelta(hours=2)))
    converted = as_utc(plus2)
    assert converted.utcoffset() == timedelta(0) and converted.hour == 21
