"""Task metrics of torch-form models: top-1 accuracy and cosine fidelity to a reference output."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from models.spec import ACCURACY_TASKS
from worker.core import ArrayDataset, WorkingModel
from worker.torch_utils import interface, module_device, predict

if TYPE_CHECKING:
    from models.spec import JobSpec


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of logits against integer labels."""
    return float((outputs.reshape(len(outputs), -1).argmax(1) == labels).mean())


def cosine_fidelity(outputs: np.ndarray, reference: np.ndarray) -> float:
    """Mean cosine similarity between per-sample flattened outputs and a reference."""
    a = outputs.reshape(len(outputs), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float((num / den).mean())


def torch_metric(
    model: WorkingModel,
    data: ArrayDataset,
    spec: JobSpec,
    *,
    reference: np.ndarray | None = None,
    device: str | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Task metric of a torch-form model on ``data``: accuracy with labels, cosine fidelity given ``reference``."""
    module = interface(model)
    device = device or module_device(model.module)
    outputs = predict(module, data, model.input_names, device, batch_size)
    metrics: dict[str, float] = {}
    if data.labels is not None and spec.task in ACCURACY_TASKS and outputs.ndim == 2:
        metrics["accuracy"] = accuracy(outputs, data.labels)
    if reference is not None:
        metrics["fidelity"] = cosine_fidelity(outputs, reference)
    return metrics
