"""text datasets: JSONL and CSV, tokenised with the model's tokenizer to max_length; label mapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import factories_train as f
from worker.core import StepFailed
from worker.formats import hf, text


@pytest.fixture
def bert(tmp_path: Path):
    return hf.load(f.tiny_bert_archive(tmp_path), {}, tmp_path / "work")


@pytest.mark.parametrize("writer", [f.write_jsonl, f.write_csv])
def test_tokenises_to_max_length_with_config_labels(tmp_path: Path, bert, writer) -> None:
    rows = f.sentences(12)
    path = writer(tmp_path / "d.txt", rows)
    spec = f.spec("text-classification", text={"max_length": 12})
    data = text.load(path, {}, bert, spec, tmp_path)
    assert set(data.inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert data.inputs["input_ids"].shape == (12, 12) and data.inputs["input_ids"].dtype == np.int64
    assert (data.inputs["input_ids"][:, 0] == 2).all()  # [CLS]
    label2id = bert.module.config.label2id
    assert data.labels is not None and list(data.labels) == [label2id[r["label"]] for r in rows]
    assert data.classes == sorted(f.TEXT_CLASSES)


def test_unknown_string_labels_sorted_and_int_labels_kept(tmp_path: Path, bert) -> None:
    spec = f.spec("text-classification", text={"max_length": 8})
    rows = [{"text": "goal match", "label": "zeta"}, {"text": "pizza", "label": "alpha"}]
    data = text.load(f.write_jsonl(tmp_path / "a.jsonl", rows), {}, bert, spec, tmp_path)
    assert data.labels is not None and list(data.labels) == [1, 0] and data.classes == ["alpha", "zeta"]
    int_rows: list[dict[str, Any]] = [{"text": "goal", "label": 2}, {"text": "pizza", "label": 0}]
    data = text.load(f.write_jsonl(tmp_path / "b.jsonl", int_rows), {}, bert, spec, tmp_path)
    assert data.labels is not None and list(data.labels) == [2, 0]


def test_unlabelled_rows_and_errors(tmp_path: Path, bert) -> None:
    spec = f.spec("feature-extraction", text={"max_length": 8})
    data = text.load(
        f.write_jsonl(tmp_path / "u.jsonl", [{"text": "goal"}, {"text": "soup"}]), {}, bert, spec, tmp_path
    )
    assert data.labels is None and len(data) == 2
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(StepFailed, match="line 2"):
        text.load(tmp_path / "bad.jsonl", {}, bert, spec, tmp_path)
    (tmp_path / "nofield.jsonl").write_text('{"body": "a"}\n')
    with pytest.raises(StepFailed, match="'text'"):
        text.load(tmp_path / "nofield.jsonl", {}, bert, spec, tmp_path)
