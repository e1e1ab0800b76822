"""The one parser for client-supplied ids and offsets: ASCII digits within signed 64 bits, else None."""

from __future__ import annotations

import pytest

from api.services.numbers import INT64_MAX, length_over, parse_int64


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("42", 42), ("007", 7), (str(INT64_MAX), INT64_MAX)])
def test_accepts_ascii_digits_within_int64(text: str, value: int) -> None:
    assert parse_int64(text) == value


@pytest.mark.parametrize(
    "text", ["", "-1", "+1", " 1", "1 ", "1.0", "²", "٣", str(INT64_MAX + 1), "9" * 20, "9" * 5000, "0x10"]
)
def test_refuses_everything_else(text: str) -> None:
    assert parse_int64(text) is None


def test_length_over_counts_a_number_past_64_bits_as_too_large() -> None:
    assert length_over("1025", 1024) is True
    assert length_over("1024", 1024) is False
    assert length_over("9" * 30, 1024) is True
    assert length_over(None, 1024) is False and length_over("abc", 1024) is False
