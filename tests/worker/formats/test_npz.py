"""npz datasets: arrays by input name, cast to the model's dtypes, labels as int64, mismatches named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.spec import JobSpec
from tests.worker.conftest import DigitsFiles
from worker.core import StepFailed, WorkingModel
from worker.formats import load_dataset, load_model

SPEC = JobSpec(model="mdl_x")


@pytest.fixture
def mlp(digits_mlp: DigitsFiles, tmp_path: Path) -> WorkingModel:
    return load_model(digits_mlp.model, "onnx", {}, tmp_path / "model")


def test_arrays_are_cast_to_the_model_dtype_and_labels_to_int64(mlp: WorkingModel, tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((7, 64))  # float64 on disk
    np.savez(tmp_path / "d.npz", pixels=x, labels=np.arange(7, dtype=np.float32), extra=np.zeros(3))
    ds = load_dataset(tmp_path / "d.npz", "npz", {}, mlp, SPEC, tmp_path)
    assert list(ds.inputs) == ["pixels"]
    assert ds.inputs["pixels"].dtype == np.float32 and ds.inputs["pixels"].shape == (7, 64)
    np.testing.assert_allclose(ds.inputs["pixels"], x.astype(np.float32))
    assert ds.labels is not None and ds.labels.dtype == np.int64 and ds.labels.tolist() == list(range(7))
    assert len(ds) == 7 and len(ds.take(3)) == 3


def test_missing_input_array_is_named(mlp: WorkingModel, tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 64), np.float32))
    with pytest.raises(StepFailed, match="no array 'pixels'") as info:
        load_dataset(tmp_path / "d.npz", "npz", {}, mlp, SPEC, tmp_path)
    assert info.value.code == "dataset_mismatch"
    assert "images" in info.value.message


def test_wrong_feature_size_and_label_count_are_mismatches(mlp: WorkingModel, tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", pixels=np.zeros((4, 63), np.float32))
    with pytest.raises(StepFailed, match="axis 1") as info:
        load_dataset(tmp_path / "a.npz", "npz", {}, mlp, SPEC, tmp_path)
    assert info.value.code == "dataset_mismatch"
    np.savez(tmp_path / "b.npz", pixels=np.zeros((4, 64), np.float32), labels=np.zeros(5, np.int64))
    with pytest.raises(StepFailed, match="labels"):
        load_dataset(tmp_path / "b.npz", "npz", {}, mlp, SPEC, tmp_path)


def test_string_labels_become_class_indices(mlp: WorkingModel, tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", pixels=np.zeros((3, 64), np.float32), labels=np.array(["cat", "dog", "cat"]))
    ds = load_dataset(tmp_path / "d.npz", "npz", {}, mlp, SPEC, tmp_path)
    assert ds.classes == ["cat", "dog"]
    assert ds.labels is not None and ds.labels.tolist() == [0, 1, 0]
