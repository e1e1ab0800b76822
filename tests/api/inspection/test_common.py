"""Shared inspection helpers: label sorting and archive listing under caps."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.inspection.common import InspectionError, label_text, list_archive, sorted_labels
from storage.archive import Limits
from tests.api import builders


def test_labels_sort_numerically_when_all_are_numbers() -> None:
    assert sorted_labels([10, 2, 2.0, 1]) == ["1", "2", "10"]
    assert sorted_labels(["b", 1, "a"]) == ["1", "a", "b"]
    assert label_text(3.0) == "3" and label_text(2.5) == "2.5"


def test_too_many_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    from api.inspection import common

    monkeypatch.setattr(common, "MAX_CLASSES", 3)
    with pytest.raises(InspectionError, match="more than 3 distinct labels"):
        sorted_labels(range(4))


def test_list_archive_applies_the_caps(tmp_path: Path) -> None:
    path = tmp_path / "up-staged"
    path.write_bytes(builders.zip_bytes({"a": b"1", "b": b"2", "c": b"3"}))
    assert [e.name for e in list_archive(path, Limits())] == ["a", "b", "c"]
    with pytest.raises(InspectionError, match="unsafe or unreadable archive: 3 entries"):
        list_archive(path, Limits(max_entries=2))
