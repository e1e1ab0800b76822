"""The tokenizer of an hf archive, read without the tokenizers library: its files, vocabulary size, a fingerprint
of its vocabulary and BPE merges (two uploads with the same fingerprint map text to the same ids) and its chat template.

``tokenizer.json`` (fast tokenizers) gives the vocabulary (``model.vocab`` as a dict or a Unigram list) plus
``added_tokens``; ``vocab.txt`` (WordPiece) one token a line; ``vocab.json`` (+ ``added_tokens.json``) the
slow BPE form. A sentencepiece-only tokenizer (``tokenizer.model``, ``spiece.model``) is present but its
vocabulary is not read (no size, the fingerprint is the file's sha256).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

from api.inspection.common import InspectionError
from storage import archive
from storage.archive import ArchiveError, Entry

MAX_TOKENIZER_BYTES = 128 * 1024 * 1024
MAX_SMALL_JSON = 16 * 1024 * 1024
VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")
SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
TOKENIZER_FILES = VOCAB_FILES + SENTENCEPIECE_FILES


def _json(path: Path, entry: Entry, max_bytes: int) -> Any:
    try:
        return json.loads(archive.read_member(path, entry, max_bytes))
    except ArchiveError as exc:
        raise InspectionError(str(exc)) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InspectionError(f"{entry.name} is not valid JSON: {exc}") from exc


def _vocab_of_tokenizer_json(doc: Any, name: str) -> dict[str, int]:
    """token -> id of a tokenizer.json (its model's vocabulary plus the added tokens)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise InspectionError(f"{name} has no 'model' object; it is not a tokenizers file")
    raw = doc["model"].get("vocab")
    vocab: dict[str, int] = {}
    if isinstance(raw, dict):
        vocab = {str(k): v for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool)}
    elif isinstance(raw, list):  # Unigram: [[piece, score], ...], the id is the position
        vocab = {str(p[0]): i for i, p in enumerate(raw) if isinstance(p, list) and p}
    for tok in doc.get("added_tokens") or []:
        if isinstance(tok, dict) and isinstance(tok.get("id"), int) and isinstance(tok.get("content"), str):
            vocab[tok["content"]] = tok["id"]
    if not vocab:
        raise InspectionError(f"{name} has an empty vocabulary")
    return vocab


def _merges(doc: Any) -> list[str]:
    """A BPE tokenizer.json's merge rules as ``"a b"`` strings (written as strings or as pairs), else []."""
    raw = doc.get("model", {}).get("merges") if isinstance(doc, dict) else None
    out: list[str] = []
    for m in raw or []:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, list) and len(m) == 2:
            out.append(f"{m[0]} {m[1]}")
    return out


def _fingerprint(vocab: dict[str, int], merges: list[str] | None = None) -> str:
    """sha256 of the (id, token) pairs in id order and the BPE merges: the same for the same mapping however
    the file was written."""
    pairs = sorted((i, t) for t, i in vocab.items())
    body = json.dumps([pairs, merges or []], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def _file_sha256(path: Path, entry: Entry) -> str:
    digest = hashlib.sha256()
    with archive.open_member(path, entry) as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def chat_template_present(path: Path, by_name: dict[str, Entry]) -> bool:
    """Whether the archive carries a chat template (chat_template.jinja/.json or in tokenizer_config.json)."""
    if "chat_template.jinja" in by_name or "chat_template.json" in by_name:
        return True
    entry = by_name.get("tokenizer_config.json")
    if entry is None:
        return False
    config = _json(path, entry, MAX_SMALL_JSON)
    return isinstance(config, dict) and bool(config.get("chat_template"))


def inspect_tokenizer(path: Path, by_name: dict[str, Entry]) -> dict[str, Any] | None:
    """``{file, vocab_size, sha256, chat_template}`` of the archive's tokenizer, or None when it has none.

    ``by_name`` maps paths relative to the model folder to archive entries; only top-level files count.
    """
    top = {rel: e for rel, e in by_name.items() if "/" not in rel}
    found = next((n for n in TOKENIZER_FILES if n in top), None)
    if found is None:
        return None
    entry = top[found]
    vocab: dict[str, int] | None = None
    merges: list[str] = []
    if found == "tokenizer.json":
        doc = _json(path, entry, MAX_TOKENIZER_BYTES)
        vocab, merges = _vocab_of_tokenizer_json(doc, found), _merges(doc)
    elif found == "vocab.txt":
        try:
            lines = archive.read_member(path, entry, MAX_TOKENIZER_BYTES).decode("utf-8").splitlines()
        except ArchiveError as exc:
            raise InspectionError(str(exc)) from exc
        except UnicodeDecodeError as exc:
            raise InspectionError(f"{found} is not UTF-8 text") from exc
        vocab = {}
        for i, line in enumerate(lines):
            vocab.setdefault(line, i)
    elif found == "vocab.json":
        raw = _json(path, entry, MAX_TOKENIZER_BYTES)
        if not isinstance(raw, dict):
            raise InspectionError(f"{found} is not a JSON object of token ids")
        vocab = {str(k): v for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool)}
        added = top.get("added_tokens.json")
        extra = _json(path, added, MAX_SMALL_JSON) if added is not None else {}
        if isinstance(extra, dict):
            vocab.update({str(k): v for k, v in extra.items() if isinstance(v, int) and not isinstance(v, bool)})
    info: dict[str, Any] = {
        "file": found,
        "files": sorted(rel for rel in top if PurePosixPath(rel).name in TOKENIZER_FILES),
        "vocab_size": None,
        "sha256": None,
        "chat_template": chat_template_present(path, top),
    }
    if vocab:
        info["vocab_size"] = max(vocab.values()) + 1
        info["sha256"] = _fingerprint(vocab, merges)
    else:
        try:
            info["sha256"] = _file_sha256(path, entry)
        except ArchiveError as exc:
            raise InspectionError(str(exc)) from exc
    return info
