"""Model and dataset loaders for the worker, one module per format, dispatched by format name."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.spec import JobSpec
    from storage.archive import Limits
    from worker.passes.base import ArrayDataset, WorkingModel


def load_model(path: Path, format: str, meta: dict[str, Any], workdir: Path) -> WorkingModel:
    """The uploaded model at ``path`` as a WorkingModel in its natural form (onnx file, or torch for hf)."""
    if format == "onnx":
        from worker.formats import onnx_model

        return onnx_model.load(path, meta, workdir)
    if format == "hf":
        from worker.formats import hf

        return hf.load(path, meta, workdir)
    raise ValueError(f"unknown model format {format!r}")


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


def extract_upload(path: Path, workdir: Path, limits: Limits, *, prefix: str, code: str, what: str) -> Path:
    """Safely extract the uploaded archive at ``path`` into a fresh folder under ``workdir``.

    A rejected archive fails the step with ``code`` (``invalid_model`` / ``invalid_dataset``) naming ``what``.
    """
    import tempfile

    from storage import archive
    from worker.passes.base import StepFailed

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
    try:
        archive.extract(Path(path), dest, limits)
    except archive.ArchiveError as exc:
        raise StepFailed(code, f"{what} rejected: {exc}") from exc
    return dest
