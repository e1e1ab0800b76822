"""The uniform pass interface: a pass takes the working model in one form and returns a new one."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from pydantic import BaseModel

if TYPE_CHECKING:
    import numpy as np

    from models.spec import JobSpec

Form = Literal["onnx", "torch"]
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
    """A dataset materialised as arrays named after the model's inputs, with optional integer labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, n: int | None) -> ArrayDataset:
        """The first ``n`` samples (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        labels = None if self.labels is None else self.labels[:n]
        return ArrayDataset({k: v[:n] for k, v in self.inputs.items()}, labels, self.classes)


@dataclass
class WorkingModel:
    """The model as it moves through a pipeline, in ``onnx`` form (a file) or ``torch`` form (a module).

    ``origin`` is how it was uploaded (``onnx`` or ``hf``); ``hf_dir`` holds the config and tokenizer
    of an hf model; ``input_names``/``output_names`` are the ONNX interface the output keeps.
    """

    form: Form
    origin: Literal["onnx", "hf"]
    input_names: list[str]
    output_names: list[str]
    onnx_path: Path | None = None
    module: Any = None
    hf_dir: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassResult:
    """What a pass returns: the new working model, scalar metrics, and an optional per-epoch curve."""

    model: WorkingModel
    metrics: dict[str, Any] = field(default_factory=dict)
    curve: list[dict[str, Any]] = field(default_factory=list)


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

    def progress(
        self,
        phase: str,
        *,
        fraction: float | None = None,
        epoch: int | None = None,
        epochs: int | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        """Report progress within the current step (``fraction`` in 0..1)."""
        ...

    def log(self, message: str, **data: Any) -> None:
        """Record an event for the job."""
        ...

    def check_cancelled(self) -> None:
        """Raise JobCancelled if the job was cancelled; call between steps, epochs and every few batches."""
        ...


class Pass(ABC):
    """One optimization: ``params`` is its pydantic step model in models/spec.py, ``takes`` its input form."""

    name: ClassVar[str]
    params: ClassVar[type[BaseModel]]
    takes: ClassVar[Form]

    @abstractmethod
    def run(self, model: WorkingModel, params: Any, ctx: PassContext) -> PassResult:
        """Apply the pass to ``model`` and return the new working model."""


class PipelineContext(PassContext, Protocol):
    """A PassContext that also hears where the pipeline is (step i of n)."""

    def begin_step(self, index: int, total: int, label: str) -> None:
        """The pipeline moved to step ``index`` (0-based) of ``total``; ``label`` becomes the phase."""
        ...
