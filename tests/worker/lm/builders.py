"""LM test data built directly with the tokenizer (the ``ArrayDataset`` contract of worker.formats.text),
so the lmeval tests do not depend on the text loader."""

from __future__ import annotations

from typing import Any

import numpy as np

from worker.core import ArrayDataset


def _pad_id(tok: Any) -> int:
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def text_dataset(tok: Any, texts: list[str], max_length: int = 32, prompts: list[str] | None = None) -> ArrayDataset:
    """One right-padded row per text (cut at ``max_length``); labels = input_ids, -100 on padding."""
    n = len(texts)
    ids = np.full((n, max_length), _pad_id(tok), dtype=np.int64)
    mask = np.zeros((n, max_length), dtype=np.int64)
    for i, t in enumerate(texts):
        row = tok(t, add_special_tokens=False)["input_ids"][:max_length]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    labels = np.where(mask == 1, ids, -100)
    meta = {"shape": "text", "prompts": prompts if prompts is not None else [" ".join(t.split()[:6]) for t in texts]}
    return ArrayDataset({"input_ids": ids, "attention_mask": mask}, labels, None, meta)


def choice_dataset(tok: Any, rows: list[dict[str, Any]], max_length: int = 32) -> ArrayDataset:
    """A ``choice`` set: the prompts tokenized like text, the raw ``{"text", "label"}`` rows in ``meta``."""
    data = text_dataset(tok, [r["text"] for r in rows], max_length)
    data.meta = {"shape": "choice", "prompts": [r["text"] for r in rows], "rows": rows}
    return data


def torch_greedy(module: Any, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens of an hf causal LM by full recomputation (no cache), independent of worker.lm."""
    import torch

    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            x = torch.tensor([ids])
            ids.append(int(module(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax()))
    return ids[len(prompt):]
