"""Model and dataset loaders for the worker, one module per format, dispatched by format name (models by their
row of ``models.formats.MODEL_FORMATS``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.spec import JobSpec
    from worker.core import ArrayDataset, WorkingModel


def load_model(path: Path, format: str, meta: dict[str, Any], workdir: Path) -> WorkingModel:
    """The uploaded model at ``path`` as a WorkingModel in its natural form (onnx file, or torch for hf)."""
    from models.formats import model_format, resolve

    loaded: WorkingModel = resolve(model_format(format).loader)(path, meta, workdir)
    return loaded


def load_dataset(
    path: Path, format: str, meta: dict[str, Any], model: WorkingModel, spec: JobSpec, workdir: Path
) -> ArrayDataset:
    """The uploaded dataset at ``path`` as arrays named after ``model``'s inputs."""
    if format == "npz":
        from worker.formats import npz

        return npz.load(path, meta, model, spec)
    if format == "imagefolder":
        from worker.formats import imagefolder

        return imagefolder.load(path, meta, model, spec, workdir)
    if format == "text":
        from worker.formats import text

        return text.load(path, meta, model, spec, workdir)
    raise ValueError(f"unknown dataset format {format!r}")
