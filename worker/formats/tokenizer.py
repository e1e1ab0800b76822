"""The tokenizer of an hf model, checked before any text is tokenised with it.

A text job whose tokenizer is missing, whose vocabulary is larger than the model's embedding table, or that
maps most of the data to the unknown token would train and evaluate on noise; each fails the step with
``tokenizer_mismatch`` naming the check (the API refuses the first two at submit from the upload's meta).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from worker.core import StepFailed, WorkingModel

# More than this share of a dataset's (non-special) tokens being the unknown token fails the step.
MAX_UNKNOWN_RATIO = 0.5


def _config_vocab_size(model: WorkingModel) -> int | None:
    config = getattr(model.module, "config", None)
    size = getattr(config, "vocab_size", None)
    if size is None and model.hf_dir is not None and (model.hf_dir / "config.json").is_file():
        try:
            size = json.loads((model.hf_dir / "config.json").read_text(encoding="utf-8")).get("vocab_size")
        except (OSError, ValueError, AttributeError):
            size = None
    return size if isinstance(size, int) and size > 0 else None


def load_tokenizer(model: WorkingModel) -> Any:
    """The model's tokenizer (AutoTokenizer, local files only, no remote code), vocabulary checked against the
    model's; StepFailed ``tokenizer_mismatch`` when it is missing or larger."""
    from transformers import AutoTokenizer

    if model.hf_dir is None:
        raise StepFailed("tokenizer_mismatch", "the model has no hf folder to load a tokenizer from")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.hf_dir, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StepFailed(
            "tokenizer_mismatch",
            f"tokenizer check: the model archive has no usable tokenizer (tokenizer.json, vocab.txt, ...): {first}",
        ) from exc
    vocab = _config_vocab_size(model)
    if vocab is not None and len(tokenizer) > vocab:
        raise StepFailed(
            "tokenizer_mismatch",
            f"tokenizer vocabulary check: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{vocab}; ids from {vocab} up have no embedding",
        )
    return tokenizer


def unknown_ratio(input_ids: np.ndarray, attention_mask: np.ndarray, tokenizer: Any) -> float | None:
    """The share of attended, non-special tokens that are the unknown token (None: no unk token, no tokens)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return None
    special = [i for i in getattr(tokenizer, "all_special_ids", []) if i != unk]
    counted = attention_mask.astype(bool) & ~np.isin(input_ids, special)
    total = int(counted.sum())
    if total == 0:
        return None
    return float(((input_ids == unk) & counted).sum()) / total


def check_unknown_tokens(input_ids: np.ndarray, attention_mask: np.ndarray, tokenizer: Any) -> None:
    """StepFailed ``tokenizer_mismatch`` when more than MAX_UNKNOWN_RATIO of the tokens are unknown."""
    ratio = unknown_ratio(input_ids, attention_mask, tokenizer)
    if ratio is not None and ratio > MAX_UNKNOWN_RATIO:
        raise StepFailed(
            "tokenizer_mismatch",
            f"unknown-token check: {ratio:.0%} of the dataset's tokens are the unknown token "
            f"{tokenizer.unk_token!r} (more than {MAX_UNKNOWN_RATIO:.0%}); the tokenizer does not fit this text",
        )
