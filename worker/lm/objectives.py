"""Token-level objectives the LM training passes share: the LM loss on labelled tokens, the eval loss and
perplexity of a torch module, and distillation's KL between softened next-token distributions.

Labels follow the LM dataset contract: int64 ``[N, T]`` aligned with ``input_ids`` (the model shifts them),
``-100`` where no loss is taken (padding, prompts, non-assistant turns).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from models.spec import LM_TASKS
from worker.core import ArrayDataset, StepFailed, WorkingModel

if TYPE_CHECKING:
    import torch

IGNORE = -100
LM_INPUTS = ("input_ids", "attention_mask")


def is_lm(model: WorkingModel, task: str | None = None) -> bool:
    """Whether ``model`` is a causal LM (its loader said so, or the job's task is text-generation)."""
    return model.meta.get("hf_task") == "text-generation" or (model.transformers and task in LM_TASKS)


def with_labels(data: ArrayDataset) -> ArrayDataset:
    """``data`` with token labels: its own when they are ``[N, T]``, else ``input_ids`` with padding masked."""
    if "input_ids" not in data.inputs:
        raise StepFailed("dataset_mismatch", "a causal LM needs token data (input_ids, attention_mask)")
    ids = data.inputs["input_ids"]
    if data.labels is not None and data.labels.shape == ids.shape:
        return data
    if data.labels is not None:
        raise StepFailed(
            "dataset_mismatch",
            f"token labels must be shaped like input_ids {list(ids.shape)}, got {list(data.labels.shape)}",
        )
    mask = data.inputs.get("attention_mask")
    labels = ids.astype(np.int64) if mask is None else np.where(mask == 1, ids, IGNORE).astype(np.int64)
    return ArrayDataset(data.inputs, labels, data.classes, data.meta)


def lm_loss_fn(module: torch.nn.Module) -> Any:
    """loss_fn(batch) = the model's own causal-LM loss on ``batch['labels']`` (mean over labelled tokens)."""

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = module(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch["labels"],
            use_cache=False,
        )
        return out.loss.float()

    return loss_fn


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over labelled positions and their count (logits at t predict labels at t+1)."""
    import torch.nn.functional as F

    shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shifted, targets, ignore_index=IGNORE, reduction="sum")
    return total, (targets != IGNORE).sum()


def eval_loss(module: torch.nn.Module, data: ArrayDataset, device: str, batch_size: int = 16) -> dict[str, float]:
    """Token-weighted eval loss (mean NLL per labelled token) and perplexity ``exp(loss)`` of ``module``."""
    import torch

    data = with_labels(data)
    assert data.labels is not None
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            for start in range(0, len(data), batch_size):
                sl = slice(start, start + batch_size)
                ids = torch.from_numpy(np.ascontiguousarray(data.inputs["input_ids"][sl])).to(device)
                mask = data.inputs.get("attention_mask")
                am = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask[sl])).to(device)
                labels = torch.from_numpy(np.ascontiguousarray(data.labels[sl])).to(device)
                logits = module(input_ids=ids, attention_mask=am, use_cache=False).logits
                s, c = token_nll(logits, labels)
                total += float(s)
                count += int(c)
    finally:
        for m, mode in modes:
            m.training = mode
    if count == 0:
        raise StepFailed("no_data", "the eval data has no labelled tokens")
    loss = total / count
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def token_kd(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2 per position, averaged over non-padding positions."""
    import torch.nn.functional as F

    T = temperature
    s = F.log_softmax(student.float() / T, -1)
    t = F.log_softmax(teacher.float() / T, -1)
    per = (t.exp() * (t - s)).sum(-1)  # [B, T]
    if mask is None:
        return per.mean() * (T * T)
    m = mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp_min(1.0) * (T * T)
