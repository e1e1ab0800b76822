"""Tokenizers read without the tokenizers library: vocabulary size, fingerprint, chat template, each file kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api.inspection import InspectionError
from api.inspection.tokenizer import inspect_tokenizer
from storage import archive
from tests.api import builders


def _inspect(tmp_path: Path, files: dict[str, bytes]) -> dict | None:
    path = tmp_path / "up.zip"
    path.write_bytes(builders.zip_bytes(files))
    by_name = {e.name: e for e in archive.list_entries(path) if not e.is_dir}
    return inspect_tokenizer(path, by_name)


def _tokenizer_json(vocab: object, added: list[dict] | None = None) -> bytes:
    return json.dumps({"model": {"type": "BPE", "vocab": vocab}, "added_tokens": added or []}).encode()


def test_tokenizer_json_counts_added_tokens_past_the_vocabulary(tmp_path: Path) -> None:
    info = _inspect(tmp_path, {"tokenizer.json": _tokenizer_json({"a": 0, "b": 1},
                                                                 [{"id": 5, "content": "<eos>"}])})
    assert info is not None and info["vocab_size"] == 6 and info["file"] == "tokenizer.json"
    assert info["chat_template"] is False


def test_a_unigram_list_vocab_and_the_fingerprint_follows_the_ids(tmp_path: Path) -> None:
    a = _inspect(tmp_path, {"tokenizer.json": _tokenizer_json([["x", -1.0], ["y", -2.0]])})
    b = _inspect(tmp_path, {"tokenizer.json": _tokenizer_json({"x": 0, "y": 1})})
    c = _inspect(tmp_path, {"tokenizer.json": _tokenizer_json({"y": 0, "x": 1})})
    assert a is not None and b is not None and c is not None
    assert a["vocab_size"] == 2 and a["sha256"] == b["sha256"] != c["sha256"]


def test_slow_bpe_vocab_json_with_added_tokens_and_a_template_in_the_config(tmp_path: Path) -> None:
    info = _inspect(tmp_path, {"vocab.json": b'{"a": 0, "b": 1, "c": 2}', "added_tokens.json": b'{"<x>": 3}',
                               "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}'})
    assert info is not None and info["vocab_size"] == 4 and info["chat_template"] is True


def test_sentencepiece_only_has_no_size_and_the_files_sha256(tmp_path: Path) -> None:
    info = _inspect(tmp_path, {"tokenizer.model": b"\x0a\x03abc", "chat_template.jinja": b"{{ x }}"})
    assert info is not None and info["vocab_size"] is None and len(info["sha256"]) == 64
    assert info["chat_template"] is True


def test_no_tokenizer_and_a_nested_one_does_not_count(tmp_path: Path) -> None:
    assert _inspect(tmp_path, {"config.json": b"{}", "sub/tokenizer.json": _tokenizer_json({"a": 0})}) is None


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        ({"tokenizer.json": b"{oops"}, "tokenizer.json is not valid JSON"),
        ({"tokenizer.json": b'{"version": "1.0"}'}, "has no 'model' object"),
        ({"tokenizer.json": _tokenizer_json({})}, "has an empty vocabulary"),
        ({"vocab.json": b"[1, 2]"}, "not a JSON object of token ids"),
    ],
)
def test_broken_tokenizer_files_are_refused(tmp_path: Path, files: dict[str, bytes], needle: str) -> None:
    with pytest.raises(InspectionError, match=needle):
        _inspect(tmp_path, files)


def test_the_fingerprint_covers_bpe_merges_whichever_way_they_are_written(tmp_path: Path) -> None:
    def doc(merges: list[object]) -> bytes:
        return json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": merges}}).encode()

    as_strings = _inspect(tmp_path, {"tokenizer.json": doc(["a b"])})
    as_pairs = _inspect(tmp_path, {"tokenizer.json": doc([["a", "b"]])})
    unmerged = _inspect(tmp_path, {"tokenizer.json": doc([])})
    assert as_strings is not None and as_pairs is not None and unmerged is not None
    assert as_strings["sha256"] == as_pairs["sha256"] != unmerged["sha256"]
