"""Inspection of a text dataset: JSONL or CSV rows in one of four shapes, detected per file.

``text``: ``{"text"}`` (language modelling, or unlabelled text); ``choice``: ``{"text", "label"}`` (a
classifier's labelled rows, or an LM's zero-/few-shot set scored against ``evaluate.choices``);
``prompt_completion``: ``{"prompt", "completion"}`` (loss on the completion only); ``messages``:
``{"messages": [{"role", "content"}, ...]}`` (chat, JSONL only; loss on the assistant turns). A row that
fits none, or a file that mixes shapes, is refused naming the line and the field.
"""

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


ROLES = ("system", "user", "assistant")
SHAPES = ("text", "choice", "prompt_completion", "messages")
MAX_TURNS = 1024


def _check_messages(lineno: int, messages: Any) -> None:
    """InspectionError naming the line and the field unless ``messages`` is a chat with an assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise InspectionError(f"line {lineno}: 'messages' must be a non-empty list of {{role, content}} objects")
    if len(messages) > MAX_TURNS:
        raise InspectionError(f"line {lineno}: 'messages' has more than {MAX_TURNS} turns")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise InspectionError(f"line {lineno}: messages[{i}] must be an object with 'role' and 'content'")
        role = turn.get("role")
        if role not in ROLES:
            raise InspectionError(f"line {lineno}: messages[{i}].role must be one of {', '.join(ROLES)} "
                                  f"(got {role!r})")
        if not isinstance(turn.get("content"), str):
            raise InspectionError(f"line {lineno}: messages[{i}].content must be a string")
    if not any(t["role"] == "assistant" for t in messages):
        raise InspectionError(f"line {lineno}: 'messages' has no assistant turn to learn or score")


def row_shape(lineno: int, row: dict[str, Any]) -> str:
    """The shape of one row (one of SHAPES); InspectionError naming the line and the field when it fits none."""
    has = {k for k in ("text", "prompt", "completion", "messages") if row.get(k) not in (None, "")}
    if "messages" in row:
        if has - {"messages"}:
            other = sorted(has - {"messages"})[0]
            raise InspectionError(f"line {lineno}: has both 'messages' and {other!r}; a row is one shape")
        _check_messages(lineno, row["messages"])
        return "messages"
    if "prompt" in row or "completion" in row:
        if "text" in has:
            raise InspectionError(f"line {lineno}: has both 'text' and 'prompt'/'completion'; a row is one shape")
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str):
                raise InspectionError(f"line {lineno}: a prompt/completion row needs {key!r} (a string)")
        if not row["completion"]:
            raise InspectionError(f"line {lineno}: 'completion' is empty; there is nothing to learn")
        return "prompt_completion"
    if not isinstance(row.get("text"), str):
        raise InspectionError(f"line {lineno}: needs a 'text' value (a string), or 'prompt' and 'completion', "
                              "or 'messages'")
    return "choice" if row.get("label") not in (None, "") else "text"


def inspect_text(path: Path) -> dict[str, Any]:
    """Sample count, columns and classes of a JSONL or CSV file with ``text`` and (optional) ``label``."""
    is_jsonl = _first_byte(path) == b"{"
    csv.field_size_limit(64 * 1024 * 1024)
    count = 0
    labels: set[Any] = set()
    labelled: bool | None = None
    label_type: str | None = None
    shape: str | None = None
    first_line = 0
    turns = 0
    with open(path, encoding="utf-8-sig", newline="" if not is_jsonl else None) as fh:
        try:
            rows = _text_rows_jsonl(fh) if is_jsonl else _text_rows_csv(fh)
            for lineno, row in rows:
                found = row_shape(lineno, row)
                if shape is None:
                    shape, first_line = found, lineno
                elif {shape, found} == {"text", "choice"}:
                    raise InspectionError(f"line {lineno}: 'label' must be given on every row or on none")
                elif found != shape:
                    raise InspectionError(f"line {lineno}: a {found!r} row, but line {first_line} is a {shape!r} "
                                          "row; a file holds rows of one shape")
                if found in ("prompt_completion", "messages"):
                    count += 1
                    turns += len(row["messages"]) if found == "messages" else 0
                    continue
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
    fields: dict[str, Any]
    if shape == "prompt_completion":
        fields = {"prompt": {"dtype": "str"}, "completion": {"dtype": "str"}}
    elif shape == "messages":
        fields = {"messages": {"dtype": "messages"}}
    else:
        fields = {"text": {"dtype": "str"}}
    if labelled:
        fields["label"] = {"dtype": label_type or "str"}
    meta: dict[str, Any] = {
        "num_samples": count,
        "fields": fields,
        "classes": sorted_labels(labels) if labelled else None,
        "text_format": "jsonl" if is_jsonl else "csv",
        "row_shape": shape,
    }
    if shape == "messages":
        meta["turns"] = turns
    return meta
