"""Tokenizer checks before text is tokenised: present, no larger than the model's vocabulary, and text that is
not mostly unknown tokens; each failure is ``tokenizer_mismatch`` naming the check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import factories_lm as lm
from tests import factories_train as f
from worker.core import StepFailed, WorkingModel
from worker.formats import hf, text
from worker.formats.tokenizer import MAX_UNKNOWN_RATIO, load_tokenizer, unknown_ratio


def _bare(folder: Path) -> WorkingModel:
    return WorkingModel(form="torch", origin="hf", input_names=["input_ids", "attention_mask"],
                        output_names=["logits"], hf_dir=folder, meta={"hf_task": "text-generation"})


def test_a_missing_tokenizer_fails_the_step(tmp_path: Path) -> None:
    folder = lm.tiny_lm_dir(tmp_path / "lm", layers=1, tokenizer=False)
    with pytest.raises(StepFailed) as err:
        load_tokenizer(_bare(folder))
    assert err.value.code == "tokenizer_mismatch" and "has no usable tokenizer" in str(err.value)


def test_a_tokenizer_larger_than_the_models_vocabulary_fails_the_step(tmp_path: Path) -> None:
    folder = lm.tiny_lm_dir(tmp_path / "lm", layers=1)
    assert len(load_tokenizer(_bare(folder))) == 384
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    with pytest.raises(StepFailed) as err:
        load_tokenizer(_bare(folder))
    assert err.value.code == "tokenizer_mismatch"
    assert "the tokenizer has 384 tokens but the model's vocab_size is 300" in str(err.value)


def test_the_unknown_ratio_counts_attended_non_special_tokens_only() -> None:
    class Tok:
        unk_token_id, all_special_ids = 1, [0, 1, 2]

    ids = np.array([[2, 1, 1, 5, 0, 0], [2, 1, 7, 8, 9, 0]])
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    assert unknown_ratio(ids, mask, Tok()) == pytest.approx(3 / 7)  # [CLS]=2 and padding are not counted

    class NoUnk:
        unk_token_id, all_special_ids = None, []

    assert unknown_ratio(ids, mask, NoUnk()) is None


def test_text_the_tokenizer_mostly_does_not_know_fails_with_the_ratio(tmp_path: Path) -> None:
    bert = hf.load(f.tiny_bert_archive(tmp_path), {}, tmp_path / "work")
    spec = f.spec("text-classification", text={"max_length": 16})
    greek = [{"text": "Καλημέρα κόσμε, τι κάνεις σήμερα;", "label": "sports"}] * 4
    with pytest.raises(StepFailed) as err:
        text.load(f.write_jsonl(tmp_path / "g.jsonl", greek), {}, bert, spec, tmp_path)
    assert err.value.code == "tokenizer_mismatch"
    assert "unknown-token check: 100% of the dataset's tokens are the unknown token '[UNK]'" in str(err.value)
    known = f.sentences(4)
    data = text.load(f.write_jsonl(tmp_path / "k.jsonl", known), {}, bert, spec, tmp_path)
    assert len(data) == 4 and MAX_UNKNOWN_RATIO == 0.5
