"""Causal-LM datasets from text rows: token ids, attention masks and loss masks (the ``worker.lm`` contract).

``inputs = {"input_ids", "attention_mask"}`` int64 ``[N, T]`` right-padded with the tokenizer's pad token (eos
when it has none); ``labels`` int64 ``[N, T]`` aligned with ``input_ids`` (the model shifts them), ``-100``
where no loss is taken. Per row shape:

- ``text``: each row's tokens + eos; packed (``text.packing``) into ``text.max_length`` blocks, else one row a
  sequence, truncated. Loss on every real token.
- ``prompt_completion``: prompt tokens (no loss), then completion tokens + eos (loss). A long prompt is cut
  from the left so that the completion keeps at least half the length.
- ``messages``: rendered with the tokenizer's chat template; loss on the assistant turns only (their content
  and the template's end-of-turn text), found by rendering each prefix of the conversation.
- ``choice`` (``{"text", "label"}``): the texts (loss on every token) and ``meta["rows"]`` for choice scoring.

``meta["prompts"]``: raw prompts for the report's greedy generations (the first tokens of a text row, the
prompt, the conversation before its last assistant turn with the generation prompt).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from worker.core import ArrayDataset, StepFailed, WorkingModel
from worker.formats.tokenizer import check_unknown_tokens, load_tokenizer

if TYPE_CHECKING:
    from models.spec import JobSpec

IGNORE = -100
PROMPT_TOKENS = 16  # a text row's prompt for generations: its first tokens
MAX_PROMPTS = 64
SHAPES = ("text", "choice", "prompt_completion", "messages")

Sequence = tuple[list[int], list[int]]  # (token ids, labels)


def row_shape(row: dict[str, Any]) -> str:
    """The shape of one row by its fields (the API's inspection validated them in detail)."""
    if "messages" in row:
        return "messages"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    return "choice" if row.get("label") not in (None, "") else "text"


def _shape_of(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    shapes = [row_shape(r) for r in rows]
    shape = str(meta.get("row_shape") or shapes[0])
    for n, found in enumerate(shapes, 1):
        if found != shape:
            raise StepFailed("invalid_dataset", f"row {n}: a {found!r} row in a {shape!r} dataset")
    return shape


def _field(rows: list[dict[str, Any]], key: str) -> list[str]:
    out = []
    for n, row in enumerate(rows, 1):
        value = row.get(key)
        if not isinstance(value, str):
            raise StepFailed("invalid_dataset", f"row {n}: {key!r} must be a string")
        out.append(value)
    return out


def _ids(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(map(int, ids)) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def _text(rows: list[dict[str, Any]], tokenizer: Any, eos: int | None, length: int, packing: bool) -> list[Sequence]:
    docs = [ids + ([eos] if eos is not None else []) for ids in _ids(tokenizer, _field(rows, "text"), True)]
    if not packing:
        return [(d[:length], d[:length]) for d in docs if d]
    stream = [t for d in docs for t in d]
    blocks = [stream[i:i + length] for i in range(0, len(stream), length)]
    return [(b, list(b)) for b in blocks if len(b) >= 2]


def _prompt_completion(rows: list[dict[str, Any]], tokenizer: Any, eos: int | None, length: int) -> list[Sequence]:
    prompts = _ids(tokenizer, _field(rows, "prompt"), True)
    completions = [c + ([eos] if eos is not None else [])
                   for c in _ids(tokenizer, _field(rows, "completion"), False)]
    out: list[Sequence] = []
    for p, c in zip(prompts, completions, strict=True):
        if len(p) + len(c) > length:
            keep = max(length - len(c), min(len(p), length // 2))
            p = p[len(p) - keep:] if keep else []
        ids = (p + c)[:length]
        labels = ([IGNORE] * len(p) + c)[:length]
        out.append((ids, labels))
    return out


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool, row: int = 0) -> str:
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))
    except Exception as exc:  # a template raises what it likes (jinja's TemplateError, raise_exception(...))
        raise StepFailed("invalid_dataset", f"row {row}: the model's chat template refused this conversation: "
                                            f"{exc}") from exc


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]], row: int) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A turn spans from the end of the prefix rendered with the generation prompt to the end of the prefix that
    includes it (so the template's end-of-turn text is learnt too); a template whose prefixes do not nest is
    read by finding each assistant content in order.
    """
    full = _render(tokenizer, messages, False, row)
    spans: list[tuple[int, int]] = []
    pos = 0
    for i, turn in enumerate(messages):
        if turn.get("role") != "assistant":
            continue
        span: tuple[int, int] | None = None
        if i > 0:
            before = _render(tokenizer, messages[:i], True, row)
            after = _render(tokenizer, messages[:i + 1], False, row)
            if full.startswith(after) and after.startswith(before) and pos <= len(before) < len(after):
                span = (len(before), len(after))
        if span is None:
            content = str(turn.get("content", ""))
            start = full.find(content, pos) if content else -1
            if start < 0 and content.strip():  # templates that trim the content
                content = content.strip()
                start = full.find(content, pos)
            if start < 0:
                raise StepFailed("invalid_dataset", f"row {row}: assistant turn messages[{i}] is not in the text "
                                                    "the chat template renders")
            span = (start, start + len(content))
        spans.append(span)
        pos = span[1]
    return full, spans


def _token_starts(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (no special tokens added) and each token's first character."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(map(int, enc["input_ids"])), [int(a) for a, _ in enc["offset_mapping"]]
    ids = list(map(int, tokenizer(text, add_special_tokens=False)["input_ids"]))
    starts, cursor = [], 0
    for n in range(1, len(ids) + 1):  # slow tokenizers: where the decoded prefix of n-1 tokens ends
        starts.append(cursor)
        cursor = len(tokenizer.decode(ids[:n]))
    return ids, starts


def _messages(rows: list[dict[str, Any]], tokenizer: Any, length: int) -> tuple[list[Sequence], list[str]]:
    if not getattr(tokenizer, "chat_template", None):
        raise StepFailed("dataset_mismatch", "messages rows need a chat template, and the model's tokenizer has none "
                                             "(chat_template.jinja or tokenizer_config.json 'chat_template')")
    out: list[Sequence] = []
    prompts: list[str] = []
    for n, row in enumerate(rows, 1):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise StepFailed("invalid_dataset", f"row {n}: 'messages' must be a non-empty list")
        full, spans = assistant_spans(tokenizer, messages, n)
        ids, starts = _token_starts(tokenizer, full)
        labels = [t if any(a <= s < b for a, b in spans) else IGNORE for t, s in zip(ids, starts, strict=True)]
        out.append((ids[:length], labels[:length]))
        last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        if len(prompts) < MAX_PROMPTS and last > 0:
            prompts.append(_render(tokenizer, messages[:last], True, n))
    return out, prompts


def _pad(seqs: list[Sequence], length: int, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(seqs)
    ids = np.full((n, length), pad, dtype=np.int64)
    mask = np.zeros((n, length), dtype=np.int64)
    labels = np.full((n, length), IGNORE, dtype=np.int64)
    for i, (toks, labs) in enumerate(seqs):
        ids[i, :len(toks)] = toks
        mask[i, :len(toks)] = 1
        labels[i, :len(labs)] = labs
    return ids, mask, labels


def lm_dataset(rows: list[dict[str, Any]], meta: dict[str, Any], model: WorkingModel, spec: JobSpec) -> ArrayDataset:
    """The LM dataset of ``rows`` for ``model`` (see the module docstring)."""
    tokenizer = load_tokenizer(model)
    shape = _shape_of(rows, meta)
    length = spec.text.max_length
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise StepFailed("tokenizer_mismatch", "tokenizer check: the tokenizer has neither a pad nor an eos token "
                                               "to pad sequences with")
    extra: dict[str, Any] = {}
    if shape == "text":
        seqs = _text(rows, tokenizer, eos, length, spec.text.packing)
        prompts = [tokenizer.decode(ids[:PROMPT_TOKENS], skip_special_tokens=True)
                   for ids in _ids(tokenizer, _field(rows[:MAX_PROMPTS], "text"), True)]
    elif shape == "prompt_completion":
        seqs = _prompt_completion(rows, tokenizer, eos, length)
        prompts = _field(rows[:MAX_PROMPTS], "prompt")
    elif shape == "messages":
        seqs, prompts = _messages(rows, tokenizer, length)
    else:  # choice
        texts = _field(rows, "text")
        seqs = [(ids[:length], ids[:length]) for ids in _ids(tokenizer, texts, True)]
        prompts = texts[:MAX_PROMPTS]
        extra["rows"] = [{"text": t, "label": str(r["label"])} for t, r in zip(texts, rows, strict=True)]
    if not seqs or not any(lab != IGNORE for _, labels in seqs for lab in labels):
        raise StepFailed("invalid_dataset", f"no token of this {shape!r} dataset carries a loss within "
                                            f"text.max_length={length}")
    ids, mask, labels = _pad(seqs, length, pad)
    check_unknown_tokens(ids, mask, tokenizer)
    return ArrayDataset({"input_ids": ids, "attention_mask": mask}, labels,
                        meta={"shape": shape, "prompts": prompts, **extra})
