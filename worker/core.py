"""The worker's foundation types: the working model, datasets as arrays, what a pass may use from its
surroundings, and the two exceptions every room of the worker raises or catches.

Every other worker module may import this one; it imports nothing from the worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict, Unpack

from models.formats import MODEL_FORMATS
from models.spec import Form

if TYPE_CHECKING:
    import numpy as np

    from models.spec import JobSpec

Role = Literal["train", "eval", "calibration"]


class StepFailed(Exception):
    """A pass failed for a reason the user can act on; ``code`` goes into the job's error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class JobCancelled(Exception):
    """Raised by ``PassContext.check_cancelled`` when the user asked to cancel."""


@dataclass
class ArrayDataset:
    """A dataset materialised as arrays named after the model's inputs, with optional labels.

    ``labels``: class indices ``[N]`` for classifiers; for causal LMs (task ``text-generation``) token
    targets ``[N, T]`` aligned with ``input_ids`` (the model shifts them), ``-100`` where no loss or
    metric is taken (padding, prompts, non-assistant turns). ``meta`` holds what is not an array: for
    LMs ``shape`` (``text``, ``prompt_completion``, ``messages``, ``choice``), ``prompts`` (raw eval
    prompts for the report's generations) and ``rows`` (the raw ``{"text", "label"}`` rows of a choice set).
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    classes: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, n: int | None) -> ArrayDataset:
        """The first ``n`` samples (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        labels = None if self.labels is None else self.labels[:n]
        return ArrayDataset({k: v[:n] for k, v in self.inputs.items()}, labels, self.classes, self.meta)

    def subset(self, rows: np.ndarray) -> ArrayDataset:
        """The samples at the indices ``rows``, in that order (a choice set's raw ``meta["rows"]`` with them)."""
        labels = None if self.labels is None else self.labels[rows]
        meta = dict(self.meta)
        if isinstance(meta.get("rows"), list) and len(meta["rows"]) == len(self):
            meta["rows"] = [meta["rows"][int(i)] for i in rows]
        return ArrayDataset({k: v[rows] for k, v in self.inputs.items()}, labels, self.classes, meta)


@dataclass
class WorkingModel:
    """The model as it moves through a pipeline, in ``onnx`` form (a file) or ``torch`` form (a module).

    ``origin`` is how it was uploaded (``onnx`` or ``hf``); ``hf_dir`` holds the config and tokenizer
    of an hf model; ``input_names``/``output_names`` are the ONNX interface the output keeps.
    """

    form: Form
    origin: str  # its upload format: a key of models.formats.MODEL_FORMATS
    input_names: list[str]
    output_names: list[str]
    onnx_path: Path | None = None
    module: Any = None
    hf_dir: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def transformers(self) -> bool:
        """Whether its upload format loads as a transformers module (passes may use its config and layers)."""
        return MODEL_FORMATS[self.origin].transformers


class Progress(TypedDict, total=False):
    """Where a step is: the ``fraction`` of it done (0..1), ``epoch`` of ``epochs``, the latest ``metrics``."""

    fraction: float | None
    epoch: int | None
    epochs: int | None
    metrics: dict[str, Any] | None


class PassContext(Protocol):
    """What a pass may use from its surroundings; implemented by the job runner (DB) and by tests."""

    workdir: Path
    device: str
    spec: JobSpec

    def dataset(self, role: Role, model: WorkingModel) -> ArrayDataset | None:
        """Arrays for ``role`` shaped for ``model``'s inputs (calibration falls back to train, then eval)."""
        ...

    def load_model(self, ref: str) -> WorkingModel:
        """A model by id, or ``"input"`` for the job's input model, in its uploaded form."""
        ...

    def progress(self, phase: str, **progress: Unpack[Progress]) -> None:
        """Report progress within the current step (``fraction`` in 0..1)."""
        ...

    def log(self, message: str, **data: Any) -> None:
        """Record an event for the job."""
        ...

    def check_cancelled(self) -> None:
        """Raise JobCancelled if the job was cancelled; call between steps, epochs and every few batches."""
        ...


class PipelineContext(PassContext, Protocol):
    """A PassContext that also hears where the pipeline is (step i of n)."""

    def begin_step(self, index: int, total: int, label: str) -> None:
        """The pipeline moved to step ``index`` (0-based) of ``total``; ``label`` becomes the phase."""
        ...


def any_data(ctx: PassContext, model: WorkingModel) -> ArrayDataset:
    """Eval data for ``model``, else train, else calibration; StepFailed when the job has none."""
    roles: tuple[Role, ...] = ("eval", "train", "calibration")
    for role in roles:
        data = ctx.dataset(role, model)
        if data is not None and len(data):
            return data
    raise StepFailed("no_data", "this step needs samples (data.eval or data.train) to trace the model")
