"""npz datasets: one array per model input (named after it) plus optional integer ``labels``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.core import ArrayDataset, StepFailed, WorkingModel

if TYPE_CHECKING:
    from models.spec import JobSpec

LABELS = "labels"


def _expected_dtypes(model: WorkingModel) -> dict[str, np.dtype[Any]]:
    if model.form == "onnx" and model.onnx_path is not None:
        from worker.formats.onnx_model import input_dtypes

        return input_dtypes(model.onnx_path)
    return {}


def _cast(name: str, array: np.ndarray, dtype: np.dtype[Any] | None) -> np.ndarray:
    if dtype is None:
        # torch-form models: the usual training dtypes
        if array.dtype.kind == "f" and array.dtype != np.float32:
            return array.astype(np.float32)
        if array.dtype.kind in "iu" and array.dtype != np.int64:
            return array.astype(np.int64)
        return array
    if array.dtype == dtype:
        return array
    if array.dtype.kind in "fc" and dtype.kind in "iub":
        raise StepFailed(
            "dataset_mismatch",
            f"array {name!r} holds {array.dtype} values but the model input expects {dtype}",
        )
    if array.dtype.kind not in "biuf":
        raise StepFailed("dataset_mismatch", f"array {name!r} has unsupported dtype {array.dtype}")
    return array.astype(dtype)


def _labels(raw: np.ndarray, n: int, classes: list[str] | None) -> tuple[np.ndarray, list[str] | None]:
    if raw.ndim != 1 or len(raw) != n:
        raise StepFailed(
            "dataset_mismatch", f"'labels' must be a 1-D array of {n} entries, got shape {list(raw.shape)}"
        )
    if raw.dtype.kind in "iub":
        return raw.astype(np.int64), classes
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw)):
            raise StepFailed("dataset_mismatch", "'labels' must hold integer class indices")
        return raw.astype(np.int64), classes
    if raw.dtype.kind in "US":
        names = sorted({str(v) for v in raw.tolist()}) if classes is None else classes
        index = {c: i for i, c in enumerate(names)}
        try:
            return np.array([index[str(v)] for v in raw.tolist()], dtype=np.int64), names
        except KeyError as e:
            raise StepFailed("dataset_mismatch", f"label {e.args[0]!r} is not among the classes") from e
    raise StepFailed("dataset_mismatch", f"'labels' has unsupported dtype {raw.dtype}")


def _input_shapes(model: WorkingModel) -> dict[str, list[Any]]:
    if model.form == "onnx" and model.onnx_path is not None:
        from worker.formats.onnx_model import interface

        specs = interface(model.onnx_path)[0]
    else:
        specs = [s for s in model.meta.get("inputs", []) if isinstance(s, dict)]
    return {s["name"]: s.get("shape") or [] for s in specs if "name" in s}


def _check_shape(name: str, array: np.ndarray, shape: list[Any] | None) -> None:
    if not shape:
        return
    if array.ndim != len(shape):
        raise StepFailed(
            "dataset_mismatch",
            f"array {name!r} has shape {list(array.shape)} but the model input has rank {len(shape)} "
            f"({shape})",
        )
    for axis, (have, want) in enumerate(zip(array.shape[1:], shape[1:], strict=True), start=1):
        if isinstance(want, int) and want > 0 and have != want:
            raise StepFailed(
                "dataset_mismatch",
                f"array {name!r} has size {have} on axis {axis}; the model input expects {want} ({shape})",
            )


def load(path: Path, meta: dict[str, Any], model: WorkingModel, spec: JobSpec) -> ArrayDataset:
    """The npz at ``path`` as arrays named after ``model``'s inputs, cast to the dtypes the model expects."""
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:
        raise StepFailed("dataset_mismatch", f"not a readable npz file: {type(e).__name__}: {e}") from e
    with archive:
        names = list(archive.files)
        missing = [n for n in model.input_names if n not in names]
        if missing:
            raise StepFailed(
                "dataset_mismatch",
                f"the dataset has no array {missing[0]!r} for model input {missing[0]!r} "
                f"(model inputs: {model.input_names}; arrays: {names})",
            )
        dtypes = _expected_dtypes(model)
        shapes = _input_shapes(model)
        inputs: dict[str, np.ndarray] = {}
        for name in model.input_names:
            try:
                array = archive[name]
            except ValueError as e:  # object arrays would need pickle
                raise StepFailed("dataset_mismatch", f"array {name!r} cannot be read: {e}") from e
            _check_shape(name, array, shapes.get(name))
            inputs[name] = _cast(name, array, dtypes.get(name))
        lengths = {n: len(a) for n, a in inputs.items()}
        if len(set(lengths.values())) > 1:
            raise StepFailed("dataset_mismatch", f"arrays have different sample counts: {lengths}")
        n = next(iter(lengths.values()))
        labels, classes = None, meta.get("classes")
        if LABELS in names:
            labels, classes = _labels(archive[LABELS], n, classes)
    return ArrayDataset(inputs=inputs, labels=labels, classes=classes)
