"""Text inspection: JSONL or CSV rows with ``text`` and an optional ``label``."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.inspection import InspectionError, inspect_text


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "up-staged"
    path.write_bytes(data)
    return path


def test_jsonl_with_a_bom_and_blank_lines(tmp_path: Path) -> None:
    data = b'\xef\xbb\xbf  {"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n'
    meta = inspect_text(_write(tmp_path, data))
    assert meta == {"num_samples": 2, "fields": {"text": {"dtype": "str"}, "label": {"dtype": "str"}},
                    "classes": ["x", "y"], "text_format": "jsonl"}


def test_csv_with_numeric_labels_and_without_labels(tmp_path: Path) -> None:
    meta = inspect_text(_write(tmp_path, b"text,label\nx,10\ny,2\nz,-1\n"))
    assert meta["classes"] == ["-1", "2", "10"] and meta["fields"]["label"] == {"dtype": "int64"}
    meta = inspect_text(_write(tmp_path, b"text\nonly\ntext\n"))
    assert meta["classes"] is None and meta["fields"] == {"text": {"dtype": "str"}} and meta["num_samples"] == 2


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b'{"text": "a", "label": 1}\n{"text": "b"}\n', "on every row or on none"),
        (b'{"text": "a", "label": true}\n', "integer or a string"),
        (b'{"text": 5}\n', "needs a 'text' value"),
        (b"label\nx\n", "line 2: needs a 'text' value"),
        (b'{"text": "a"}\n[1]\n', "line 2: expected a JSON object"),
        (b"text,label\na,1,extra\n", "more values than header columns"),
        (b"", "the CSV file has no header row"),
        (b"text\n", "holds no rows"),
    ],
)
def test_refusals(tmp_path: Path, data: bytes, needle: str) -> None:
    with pytest.raises(InspectionError, match=needle):
        inspect_text(_write(tmp_path, data))
