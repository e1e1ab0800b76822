"""Inspection of a text dataset: JSONL or CSV rows with ``text`` and an optional ``label``."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from api.inspection.common import MAX_CLASSES, InspectionError, sorted_labels


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        while chunk := fh.read(4096):
            stripped = chunk.lstrip()
            if stripped.startswith(b"\xef\xbb\xbf"):
                stripped = stripped[3:].lstrip()
            if stripped:
                return stripped[:1]
    return b""


def _text_rows_jsonl(fh: io.TextIOBase) -> Iterable[tuple[int, dict[str, Any]]]:
    for lineno, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InspectionError(f"line {lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise InspectionError(f"line {lineno}: expected a JSON object")
        yield lineno, row


def _text_rows_csv(fh: io.TextIOBase) -> Iterable[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(fh)
    if reader.fieldnames is None:
        raise InspectionError("the CSV file has no header row")
    for row in reader:
        if None in row:
            raise InspectionError(f"line {reader.line_num}: more values than header columns")
        yield reader.line_num, dict(row)


def inspect_text(path: Path) -> dict[str, Any]:
    """Sample count, columns and classes of a JSONL or CSV file with ``text`` and (optional) ``label``."""
    is_jsonl = _first_byte(path) == b"{"
    csv.field_size_limit(64 * 1024 * 1024)
    count = 0
    labels: set[Any] = set()
    labelled: bool | None = None
    label_type: str | None = None
    with open(path, encoding="utf-8-sig", newline="" if not is_jsonl else None) as fh:
        try:
            rows = _text_rows_jsonl(fh) if is_jsonl else _text_rows_csv(fh)
            for lineno, row in rows:
                text = row.get("text")
                if not isinstance(text, str):
                    raise InspectionError(f"line {lineno}: needs a 'text' value (a string)")
                has_label = row.get("label") not in (None, "")
                if labelled is None:
                    labelled = has_label
                elif labelled != has_label:
                    raise InspectionError(f"line {lineno}: 'label' must be given on every row or on none")
                if has_label:
                    label = row["label"]
                    if isinstance(label, bool) or not isinstance(label, int | str):
                        raise InspectionError(f"line {lineno}: 'label' must be an integer or a string")
                    if isinstance(label, str) and not is_jsonl and label.strip().lstrip("-").isdigit():
                        label = int(label)
                    labels.add(label)
                    if len(labels) > MAX_CLASSES:
                        raise InspectionError(f"more than {MAX_CLASSES} distinct labels")
                    label_type = "int64" if isinstance(label, int) and label_type != "str" else "str"
                count += 1
        except UnicodeDecodeError as exc:
            raise InspectionError(f"the file is not UTF-8 text ({exc.reason})") from exc
        except csv.Error as exc:
            raise InspectionError(f"the CSV file is malformed: {exc}") from exc
    if count == 0:
        raise InspectionError("the file holds no rows")
    fields: dict[str, Any] = {"text": {"dtype": "str"}}
    if labelled:
        fields["label"] = {"dtype": label_type or "str"}
    return {
        "num_samples": count,
        "fields": fields,
        "classes": sorted_labels(labels) if labelled else None,
        "text_format": "jsonl" if is_jsonl else "csv",
    }
