"""The pipeline's contexts: ``LocalContext`` over local files (tests, benchmarks, CLI runs) and its
DB-backed subclass ``DBContext`` (the job runner), whose progress, events and cancel flag live in the
jobs table.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack

from sqlalchemy import select, update
from sqlalchemy.orm import aliased

from models.db import retry_transient, session_scope
from models.tables import Job, utcnow
from worker.core import ArrayDataset, JobCancelled, Progress, Role, StepFailed, WorkingModel
from worker.records import ACTIVE, Claim, add_event

if TYPE_CHECKING:
    from models.spec import JobSpec
    from worker.passes.adapters import AdapterSource

# (path, format, meta) of an uploaded model or dataset
FileRef = tuple[Path, str, dict[str, Any]]

PROGRESS_MIN_INTERVAL_S = 0.5  # the least time between two progress writes to the job row
CANCEL_POLL_INTERVAL_S = 1.0  # the least time between two reads of the job's cancel flag
_NO_PROGRESS: Progress = {"fraction": None, "epoch": None, "epochs": None, "metrics": None}
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


def metrics_message(phase: str, metrics: dict[str, Any] | None) -> str:
    """An event's text: the phase and its numeric metrics (``finetune epoch 2/3  loss=0.4123 accuracy=0.931``)."""
    shown = [
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in (metrics or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    return f"{phase}  {' '.join(shown)}" if shown else phase


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
        # Set once calibration rows were carved from data.eval: the counts, for the events and the report.
        self.calibration_split: dict[str, Any] | None = None
        # Where an ``adapters: merge`` step gets its task adapters when child jobs train them (the job runner's
        # ``worker.adapter_jobs``); None: the step trains them itself, one after the other.
        self.task_adapters: AdapterSource | None = None

    # -- data ----------------------------------------------------------------------------------

    def _model_ref(self, ref: str) -> FileRef:
        key = self.spec.model if ref == "input" and ref not in self.models else ref
        try:
            return self.models[key]
        except KeyError:
            raise KeyError(f"unknown model {ref!r}") from None

    def model_file(self, ref: str) -> FileRef:
        """A model's stored file, format and inspection meta, not loaded (``"input"``: the job's)."""
        return self._model_ref(ref)

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
        first = self.spec.first_task_data()  # a multi-task job: its first task's rows stand for the job's
        if first is not None and role == "calibration":
            return first.train  # never the eval rows its accuracy is measured on
        if first is not None and role != "train":
            return first.eval or first.train
        return None

    def dataset(self, role: Role, model: WorkingModel) -> ArrayDataset | None:
        """Arrays for ``role`` shaped for ``model``'s inputs, loaded once per (dataset, model interface).

        A job whose steps calibrate but that gives neither data.calibration nor data.train calibrates on rows
        carved from data.eval and measures on the others (``calibration_split``), never on the same rows."""
        ref = self.dataset_ref(role)
        if ref is None:
            return None
        if role != "train" and ref == self.spec.data.eval and self.spec.carves_calibration():
            return self._carved(role, ref, model)
        return self.dataset_by_id(ref, model)

    def _carved(self, role: Role, ref: str, model: WorkingModel) -> ArrayDataset | None:
        """``role``'s part of the eval dataset ``ref``: a seeded permutation's first rows calibrate, the rest evaluate."""
        import numpy as np

        from models.spec import carve_refusal, carve_sizes

        key = (ref, tuple(model.input_names), model.form, self._dtypes_key(model), role)
        if key not in self._dataset_cache:
            full = self.dataset_by_id(ref, model)
            if full is None:
                return None
            sizes = carve_sizes(self.spec, len(full))
            if sizes is None:
                raise StepFailed("calibration_data_missing", carve_refusal(self.spec, len(full)))
            order = np.random.default_rng(self.spec.seed).permutation(len(full))
            rows = order[: sizes[0]] if role == "calibration" else order[sizes[0]:]
            self._dataset_cache[key] = full.subset(np.sort(rows))
            if self.calibration_split is None:
                self._note_split(ref, *sizes)
        return self._dataset_cache[key]

    def _note_split(self, ref: str, calibration: int, rest: int) -> None:
        readers = ", ".join(field for field, _ in self.spec.calibration_readers())
        message = (f"calibrated on {calibration} rows carved from eval ({ref}); accuracy measured on the other "
                   f"{rest} (no data.calibration or data.train given; {readers} calibrate; rows drawn with "
                   f"seed {self.spec.seed})")
        self.calibration_split = {"dataset": ref, "calibration_rows": calibration, "eval_rows": rest,
                                  "seed": self.spec.seed, "message": message}
        self.log(message, calibration_rows=calibration, eval_rows=rest, dataset=ref)

    def dataset_by_id(self, ref: str, model: WorkingModel) -> ArrayDataset | None:
        """The dataset ``ref`` (one the job reads, e.g. a task's) shaped for ``model``'s inputs, loaded once."""
        key = (ref, tuple(model.input_names), model.form, self._dtypes_key(model))
        if key not in self._dataset_cache:
            from worker.formats import load_dataset

            path, fmt, meta = self.datasets[ref]
            self._dataset_cache[key] = load_dataset(path, fmt, meta, model, self.spec, self.workdir / "data")
        return self._dataset_cache[key]

    def classes(self) -> list[str] | None:
        """The class names (by label index) of the eval, else train, data this job loaded; None if none had any."""
        roles: tuple[Role, ...] = ("eval", "train")
        for role in roles:
            ref = self.dataset_ref(role)
            for key, data in self._dataset_cache.items():
                if key[0] == ref and ref is not None and data is not None and data.classes:
                    return list(data.classes)
        return None

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

    def progress(self, phase: str, **progress: Unpack[Progress]) -> None:
        """Progress within the current step."""
        self._event("progress", phase=phase, **{**_NO_PROGRESS, **progress})

    def log(self, message: str, **data: Any) -> None:
        """Record an event for the job."""
        self._event("log", message=message, data=data)

    def check_cancelled(self) -> None:
        """Raise JobCancelled once ``self.cancelled`` is set."""
        if self.cancelled:
            raise JobCancelled()


class DBContext(LocalContext):
    """LocalContext whose progress, events and cancel flag live in the jobs table (for ``claim``'s attempt)."""

    def __init__(self, claim: Claim, *args: Any, **kwargs: Any) -> None:
        """``claim`` (the job and attempt it writes for), then LocalContext's arguments."""
        super().__init__(*args, **kwargs)
        self.claim = claim
        self._step = 0
        self._steps = 0
        self._last_write = 0.0
        self._last_cancel_check = 0.0

    def begin_step(self, index: int, total: int, label: str) -> None:
        """Record the step, write it as the job's phase and add a phase event."""
        super().begin_step(index, total, label)
        self._step, self._steps = index, total
        self._write(label, {"fraction": 0.0}, force=True)
        add_event(self.claim.job_id, "phase", label, step=index + 1, steps=total)

    def progress(self, phase: str, **progress: Unpack[Progress]) -> None:
        """Write progress to the job row (throttled unless an epoch ended); epochs and metrics become events."""
        super().progress(phase, **progress)
        epoch, metrics = progress.get("epoch"), progress.get("metrics")
        milestone = epoch is not None or metrics is not None
        self._write(phase, progress, force=milestone)
        if milestone:
            add_event(self.claim.job_id, "progress", metrics_message(phase, metrics), epoch=epoch,
                      epochs=progress.get("epochs"), metrics=metrics or {})

    def log(self, message: str, **data: Any) -> None:
        """Record a log event for the job."""
        super().log(message, **data)
        add_event(self.claim.job_id, "log", message, **data)

    def check_cancelled(self) -> None:
        """Raise JobCancelled once the job's cancel flag is set (read at most once a CANCEL_POLL_INTERVAL_S)."""
        now = time.monotonic()
        if now - self._last_cancel_check >= CANCEL_POLL_INTERVAL_S:
            self._last_cancel_check = now
            self.cancelled = self._cancel_requested()
        super().check_cancelled()

    @retry_transient()
    def _cancel_requested(self) -> bool:
        """This job's cancel flag, or its parent's (a child job stops with the job that started it)."""
        parent = aliased(Job)
        with session_scope() as s:
            row = s.execute(select(Job.cancel_requested, parent.cancel_requested)
                            .outerjoin(parent, parent.id == Job.parent_id).where(Job.id == self.claim.job_id)).first()
        return row is not None and (bool(row[0]) or bool(row[1]))

    def _write(self, phase: str, progress: Progress, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < PROGRESS_MIN_INTERVAL_S:
            return
        self._last_write = now
        within = min(max(progress.get("fraction") or 0.0, 0.0), 1.0)
        percent = 100.0 * (self._step + within) / self._steps if self._steps else 0.0
        row: dict[str, Any] = {"step": self._step + 1, "steps": self._steps, "percent": round(percent, 1),
                               "epoch": progress.get("epoch"), "epochs": progress.get("epochs"),
                               "metrics": progress.get("metrics") or {}}
        self._write_row(phase, row)

    @retry_transient()
    def _write_row(self, phase: str, row: dict[str, Any]) -> None:
        with session_scope() as s:
            s.execute(
                update(Job)
                .where(Job.id == self.claim.job_id, Job.attempt == self.claim.attempt, Job.status.in_(ACTIVE))
                .values(phase=phase[:128], progress=row, heartbeat_at=utcnow())
            )
