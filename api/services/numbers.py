"""The one parser for numbers a client puts in a header or query (event ids, byte offsets)."""

from __future__ import annotations

import re

INT64_MAX = 2**63 - 1  # the databases' signed BIGINT, and so the largest id or offset worth reading
_DIGITS = re.compile(r"[0-9]{1,19}")


def parse_int64(text: str) -> int | None:
    """``text`` as a non-negative int when it is 1 to 19 ASCII digits within signed 64 bits, else None.

    ``str.isdigit`` and ``int`` accept Unicode digits ("²", "٣") and thousands of digits (past Python's
    4300-digit limit ``int`` raises), and a 20-digit id overflows the database's BIGINT mid-query.
    """
    if not _DIGITS.fullmatch(text):
        return None
    value = int(text)
    return value if value <= INT64_MAX else None


def length_over(declared: str | None, limit: int) -> bool:
    """Whether a ``Content-Length`` header already says the body is over ``limit`` (past 64 bits is)."""
    if not declared or not (declared.isascii() and declared.isdigit()):
        return False
    value = parse_int64(declared)
    return value is None or value > limit
