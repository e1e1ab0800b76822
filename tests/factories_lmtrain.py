"""Test builders for the LM training passes: token datasets in the LM dataset contract (built straight with
the tokenizer, as ``worker.formats.text`` will), the LM working model, and layers made an identity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.factories_lm import licence_paragraphs, tiny_lm_dir
from worker.core import ArrayDataset, WorkingModel


def token_dataset(tok: Any, texts: list[str], max_length: int = 48) -> ArrayDataset:
    """``{"text"}`` rows as an LM dataset: right-padded ids, mask, labels = ids (-100 on padding)."""
    enc = tok(texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="np")
    ids = enc["input_ids"].astype(np.int64)
    mask = enc["attention_mask"].astype(np.int64)
    labels = np.where(mask == 1, ids, -100).astype(np.int64)
    return ArrayDataset({"input_ids": ids, "attention_mask": mask}, labels, meta={"shape": "text", "prompts": []})


def prompt_dataset(tok: Any, rows: list[dict[str, str]], max_length: int = 48) -> ArrayDataset:
    """``{"prompt", "completion"}`` rows as an LM dataset with the loss on the completion only."""
    ids = np.full((len(rows), max_length), tok.pad_token_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, -100)
    for i, row in enumerate(rows):
        p = tok(row["prompt"])["input_ids"]
        c = tok(row["completion"])["input_ids"] + [tok.eos_token_id]
        seq = (p + c)[:max_length]
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = seq[len(p) :]
    return ArrayDataset({"input_ids": ids, "attention_mask": mask}, labels, meta={"shape": "prompt_completion"})


def lm_model(folder: Path) -> WorkingModel:
    """The LM working model of an hf folder (the ``worker.formats.hf`` contract)."""
    from transformers import AutoModelForCausalLM

    module = AutoModelForCausalLM.from_pretrained(folder).eval()
    return WorkingModel(
        form="torch", origin="hf", input_names=["input_ids", "attention_mask"], output_names=["logits"],
        module=module, hf_dir=folder, meta={"hf_task": "text-generation"},
    )


def make_identity(module: Any, layers: list[int]) -> None:
    """Zero the output projections of attention and MLP in ``layers`` so each passes its input through."""
    import torch

    from worker.lm.importance import decoder_layers

    with torch.no_grad():
        for i in layers:
            block = decoder_layers(module)[i]
            if hasattr(block, "self_attn"):  # Llama family
                block.self_attn.o_proj.weight.zero_()
                block.mlp.down_proj.weight.zero_()
            else:  # GPT-2: Conv1D output projections with biases
                for proj in (block.attn.c_proj, block.mlp.c_proj):
                    proj.weight.zero_()
                    proj.bias.zero_()


def licence_split(n_train: int = 48, n_eval: int = 16) -> tuple[list[str], list[str]]:
    """Disjoint train / eval paragraphs of the GPL-3 and Apache-2.0 licences."""
    paras = licence_paragraphs()
    return paras[:n_train], paras[n_train : n_train + n_eval]


def tiny_lm(folder: Path, **kwargs: Any) -> tuple[Path, Any]:
    """A tiny causal LM folder and its tokenizer."""
    from transformers import AutoTokenizer

    path = tiny_lm_dir(folder, **kwargs)
    return path, AutoTokenizer.from_pretrained(path)
