"""Text inspection: JSONL or CSV rows in the text, choice, prompt/completion and messages shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.inspection import InspectionError, inspect_text
from tests.api.conftest import blobs, temp_files
from tests.factories_lm import chat_rows, prompt_rows, text_rows


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "up-staged"
    path.write_bytes(data)
    return path


def test_jsonl_with_a_bom_and_blank_lines(tmp_path: Path) -> None:
    data = b'\xef\xbb\xbf  {"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n'
    meta = inspect_text(_write(tmp_path, data))
    assert meta == {"num_samples": 2, "fields": {"text": {"dtype": "str"}, "label": {"dtype": "str"}},
                    "classes": ["x", "y"], "text_format": "jsonl", "row_shape": "choice"}


def test_csv_with_numeric_labels_and_without_labels(tmp_path: Path) -> None:
    meta = inspect_text(_write(tmp_path, b"text,label\nx,10\ny,2\nz,-1\n"))
    assert meta["classes"] == ["-1", "2", "10"] and meta["fields"]["label"] == {"dtype": "int64"}
    meta = inspect_text(_write(tmp_path, b"text\nonly\ntext\n"))
    assert meta["classes"] is None and meta["fields"] == {"text": {"dtype": "str"}} and meta["num_samples"] == 2
    assert meta["row_shape"] == "text"


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


def _jsonl(rows: list[object]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_each_lm_row_shape_is_detected_and_reported(tmp_path: Path) -> None:
    meta = inspect_text(_write(tmp_path, _jsonl(text_rows(5))))
    assert meta["row_shape"] == "text" and meta["num_samples"] == 5 and meta["classes"] is None
    meta = inspect_text(_write(tmp_path, _jsonl(prompt_rows(4))))
    assert meta["row_shape"] == "prompt_completion" and meta["num_samples"] == 4
    assert meta["fields"] == {"prompt": {"dtype": "str"}, "completion": {"dtype": "str"}} and meta["classes"] is None
    meta = inspect_text(_write(tmp_path, _jsonl(chat_rows(3))))
    assert meta["row_shape"] == "messages" and meta["num_samples"] == 3 and meta["turns"] == 9
    assert meta["fields"] == {"messages": {"dtype": "messages"}}
    meta = inspect_text(_write(tmp_path, b"prompt,completion\nThe licence ,says this\nA,b\n"))
    assert meta["row_shape"] == "prompt_completion" and meta["text_format"] == "csv" and meta["num_samples"] == 2


def _chat(*turns: object) -> dict[str, object]:
    return {"messages": list(turns)}


USER = {"role": "user", "content": "hi"}
BOT = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        ([{"body": "x"}], "line 1: needs a 'text' value (a string), or 'prompt' and 'completion', or 'messages'"),
        ([{"prompt": "a"}], "line 1: a prompt/completion row needs 'completion' (a string)"),
        ([{"prompt": 3, "completion": "b"}], "line 1: a prompt/completion row needs 'prompt' (a string)"),
        ([{"prompt": "a", "completion": ""}], "line 1: 'completion' is empty"),
        ([{"text": "a", "prompt": "b", "completion": "c"}], "line 1: has both 'text' and 'prompt'/'completion'"),
        ([{"text": "a", "messages": [USER, BOT]}], "line 1: has both 'messages' and 'text'"),
        ([_chat(USER, BOT), {"messages": []}], "line 2: 'messages' must be a non-empty list"),
        ([{"messages": "hi"}], "line 1: 'messages' must be a non-empty list"),
        ([_chat(USER, "hello")], "line 1: messages[1] must be an object with 'role' and 'content'"),
        ([_chat(USER, {"role": "bot", "content": "x"})],
         "line 1: messages[1].role must be one of system, user, assistant (got 'bot')"),
        ([_chat(USER, {"role": "assistant", "content": None})], "line 1: messages[1].content must be a string"),
        ([_chat(USER, USER)], "line 1: 'messages' has no assistant turn"),
        ([{"text": "a"}, {"prompt": "p", "completion": "c"}],
         "line 2: a 'prompt_completion' row, but line 1 is a 'text' row; a file holds rows of one shape"),
        ([_chat(USER, BOT), {"text": "a", "label": "x"}], "line 2: a 'choice' row, but line 1 is a 'messages' row"),
    ],
)
def test_a_row_of_no_shape_or_of_another_shape_names_the_line_and_the_field(
    tmp_path: Path, rows: list[object], needle: str
) -> None:
    with pytest.raises(InspectionError) as err:
        inspect_text(_write(tmp_path, _jsonl(rows)))
    assert needle in str(err.value)


def test_a_bad_lm_row_upload_is_a_422_and_leaves_nothing(client: TestClient, storage_dir: Path) -> None:
    data = _jsonl([*chat_rows(2), _chat(USER, {"role": "robot", "content": "x"})])
    r = client.put("/v1/datasets", params={"name": "chat", "format": "text"}, content=data)
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == "invalid_dataset"
    assert body["detail"] == ("not a valid text dataset: line 3: messages[1].role must be one of system, user, "
                              "assistant (got 'robot')")
    assert blobs(storage_dir) == [] and temp_files(storage_dir) == []
    assert client.get("/v1/datasets").json()["data"] == []


def test_an_lm_row_upload_reports_its_shape(client: TestClient) -> None:
    r = client.put("/v1/datasets", params={"name": "chat", "format": "text"}, content=_jsonl(chat_rows(4)))
    assert r.status_code == 201, r.text
    assert r.json()["meta"]["row_shape"] == "messages" and r.json()["num_samples"] == 4
