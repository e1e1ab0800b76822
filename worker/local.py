"""LocalContext: a PipelineContext over local files, without a database (tests, benchmarks, CLI runs).

The job runner's DB-backed context subclasses it and overrides progress / log / check_cancelled /
begin_step.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.passes.base import ArrayDataset, JobCancelled, Role, WorkingModel

if TYPE_CHECKING:
    from models.spec import JobSpec

# (path, format, meta) of an uploaded model or dataset
FileRef = tuple[Path, str, dict[str, Any]]

_FALLBACK: dict[str, tuple[str, ...]] = {
    "calibration": ("calibration", "train", "eval"),
    "train": ("train",),
    "eval": ("eval",),
}


def default_device() -> str:
    """``cuda`` when torch is installed and sees a GPU, else ``cpu`` (torch imported only if present)."""
    if importlib.util.find_spec("torch") is None:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _safe_dir_name(ref: str) -> str:
    """A directory name for a model id: client-supplied strings never become paths as they are."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", ref)[:40] or "model"
    return f"{stem}-{hashlib.sha256(ref.encode()).hexdigest()[:8]}"


class LocalContext:
    """A PipelineContext backed by local files; events go to ``self.events``, cancel via ``self.cancelled``."""

    def __init__(
        self,
        workdir: Path,
        spec: JobSpec,
        *,
        models: dict[str, FileRef],
        datasets: dict[str, FileRef] | None = None,
        device: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self.device = device or default_device()
        self.models = dict(models)
        self.datasets = dict(datasets or {})
        self.events: list[dict[str, Any]] = []
        self.cancelled = False
        self._dataset_cache: dict[tuple[Any, ...], ArrayDataset | None] = {}

    # -- data ----------------------------------------------------------------------------------

    def _model_ref(self, ref: str) -> FileRef:
        key = self.spec.model if ref == "input" and ref not in self.models else ref
        try:
            return self.models[key]
        except KeyError:
            raise KeyError(f"unknown model {ref!r}") from None

    def load_model(self, ref: str) -> WorkingModel:
        """A model by id, or ``"input"`` for the job's input model, in its uploaded form."""
        from worker.formats import load_model

        path, fmt, meta = self._model_ref(ref)
        return load_model(path, fmt, meta, self.workdir / "models" / _safe_dir_name(ref))

    def dataset_ref(self, role: Role) -> str | None:
        """The dataset id used for ``role`` (calibration falls back to train, then eval)."""
        for r in _FALLBACK[role]:
            ref = getattr(self.spec.data, r)
            if ref is not None:
                return str(ref)
        return None

    def dataset(self, role: Role, model: WorkingModel) -> ArrayDataset | None:
        """Arrays for ``role`` shaped for ``model``'s inputs, loaded once per (dataset, model interface)."""
        ref = self.dataset_ref(role)
        if ref is None:
            return None
        key = (ref, tuple(model.input_names), model.form, self._dtypes_key(model))
        if key not in self._dataset_cache:
            from worker.formats import load_dataset

            path, fmt, meta = self.datasets[ref]
            self._dataset_cache[key] = load_dataset(path, fmt, meta, model, self.spec, self.workdir / "data")
        return self._dataset_cache[key]

    @staticmethod
    def _dtypes_key(model: WorkingModel) -> tuple[tuple[str, str], ...]:
        if model.form != "onnx" or model.onnx_path is None:
            return ()
        from worker.formats.onnx_model import input_dtypes

        return tuple(sorted((k, str(v)) for k, v in input_dtypes(model.onnx_path).items()))

    # -- reporting (overridden by the DB-backed context) -----------------------------------------

    def _event(self, kind: str, **data: Any) -> None:
        self.events.append({"kind": kind, "time": time.time(), **data})

    def begin_step(self, index: int, total: int, label: str) -> None:
        """The pipeline moved to step ``index`` (0-based) of ``total``."""
        self._event("step", index=index, total=total, label=label)

    def progress(
        self,
        phase: str,
        *,
        fraction: float | None = None,
        epoch: int | None = None,
        epochs: int | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        """Progress within the current step."""
        self._event("progress", phase=phase, fraction=fraction, epoch=epoch, epochs=epochs, metrics=metrics)

    def log(self, message: str, **data: Any) -> None:
        """Record an event for the job."""
        self._event("log", message=message, data=data)

    def check_cancelled(self) -> None:
        """Raise JobCancelled once ``self.cancelled`` is set."""
        if self.cancelled:
            raise JobCancelled()
