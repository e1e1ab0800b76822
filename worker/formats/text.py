"""Text datasets: JSONL or CSV rows tokenised with the model's tokenizer.

Classifiers and encoders: rows with ``text`` and (optionally) ``label``, padded and truncated to
``spec.text.max_length``; arrays named after the model's inputs; labels mapped through the model config's
label2id when it names them, integers kept, other strings by sorted order.

Causal LMs (task ``text-generation``): the LM dataset of ``worker.lm`` (``input_ids``/``attention_mask``
right-padded, token ``labels`` with ``-100`` where no loss is taken) built by ``worker.formats.lm_text``.
Every text dataset passes the tokenizer checks there first (present, vocabulary within the model's,
not mostly unknown tokens).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.spec import LM_TASKS
from worker.core import ArrayDataset, StepFailed, WorkingModel
from worker.formats.tokenizer import check_unknown_tokens, load_tokenizer

if TYPE_CHECKING:
    from models.spec import JobSpec

MAX_BYTES = 2 * 1024**3
MAX_ROWS = 5_000_000


def _read_text(path: Path) -> str:
    if path.stat().st_size > MAX_BYTES:
        raise StepFailed("invalid_dataset", f"text dataset is larger than {MAX_BYTES} bytes")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise StepFailed("invalid_dataset", f"text dataset is not UTF-8: {exc}") from exc


def read_rows(path: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of a JSONL file (first character ``{``) or a CSV file with a header."""
    content = _read_text(Path(path))
    kind = meta.get("text_format") or ("jsonl" if content.lstrip().startswith("{") else "csv")
    rows: list[dict[str, Any]] = []
    if kind == "jsonl":
        for n, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StepFailed("invalid_dataset", f"line {n}: not JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise StepFailed("invalid_dataset", f"line {n}: expected a JSON object")
            rows.append(row)
            if len(rows) > MAX_ROWS:
                raise StepFailed("invalid_dataset", f"more than {MAX_ROWS} rows")
    else:
        reader = csv.DictReader(io.StringIO(content))
        for row in reader:
            rows.append(dict(row))
            if len(rows) > MAX_ROWS:
                raise StepFailed("invalid_dataset", f"more than {MAX_ROWS} rows")
    if not rows:
        raise StepFailed("invalid_dataset", "the text dataset has no rows")
    return rows


def is_lm(model: WorkingModel, spec: JobSpec) -> bool:
    """Whether the data is for a causal LM: the job's task, or the loaded model's (a ``generic`` job on an LM)."""
    return spec.task in LM_TASKS or model.meta.get("hf_task") in LM_TASKS


def load(path: Path, meta: dict[str, Any], model: WorkingModel, spec: JobSpec, workdir: Path) -> ArrayDataset:
    """The JSONL/CSV file at ``path`` tokenised for ``model`` (which must carry an hf tokenizer)."""
    from worker.formats.hf import encode_labels

    if model.hf_dir is None:
        raise StepFailed(
            "dataset_mismatch", "text datasets need an hf model (its tokenizer tokenises the text)"
        )
    if is_lm(model, spec):
        from worker.formats.lm_text import lm_dataset

        return lm_dataset(read_rows(Path(path), meta), meta, model, spec)
    text_field = meta.get("text_field", "text")
    label_field = meta.get("label_field", "label")
    rows = read_rows(Path(path), meta)
    try:
        texts = [str(r[text_field]) for r in rows]
    except KeyError:
        raise StepFailed("invalid_dataset", f"every row needs a {text_field!r} field") from None
    have = [label_field in r and r[label_field] not in (None, "") for r in rows]
    if any(have) and not all(have):
        raise StepFailed("invalid_dataset", f"some rows have a {label_field!r} and some do not")

    tokenizer = load_tokenizer(model)
    enc = tokenizer(
        texts, padding="max_length", truncation=True, max_length=spec.text.max_length, return_tensors="np"
    )
    check_unknown_tokens(np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"]), tokenizer)
    inputs: dict[str, np.ndarray] = {}
    for name in model.input_names:
        if name in enc:
            inputs[name] = np.asarray(enc[name], dtype=np.int64)
        elif name == "token_type_ids":
            inputs[name] = np.zeros_like(np.asarray(enc["input_ids"]), dtype=np.int64)
        else:
            raise StepFailed("dataset_mismatch", f"the tokenizer does not produce model input {name!r}")
    if not all(have):
        return ArrayDataset(inputs)
    labels, classes = encode_labels([r[label_field] for r in rows], model)
    return ArrayDataset(inputs, labels, classes)
