"""What every inspector shares: the error a user sees, archive listing under caps, label sorting."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from storage import archive
from storage.archive import ArchiveError, Entry, Limits

MAX_CLASSES = 100_000


class InspectionError(ValueError):
    """The upload is not a valid file of its declared format; the message tells the user why."""


def list_archive(path: Path, limits: Limits) -> list[Entry]:
    """The members of the archive at ``path`` under ``limits``; InspectionError when unsafe or unreadable."""
    try:
        return archive.list_entries(path, limits)
    except ArchiveError as exc:
        raise InspectionError(f"unsafe or unreadable archive: {exc}") from exc


def sorted_labels(values: Iterable[Any]) -> list[str]:
    """Unique labels sorted numerically when they are all numbers, else as text; returned as strings."""
    unique = set(values)
    if len(unique) > MAX_CLASSES:
        raise InspectionError(f"more than {MAX_CLASSES} distinct labels; labels must be class ids or names")
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in unique):
        return [label_text(v) for v in sorted(unique)]
    return sorted(label_text(v) for v in unique)


def label_text(v: Any) -> str:
    """A label as text; a whole float (3.0) as its integer (``3``)."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)
