"""npz inspection: samples, fields and classes read from array headers, never from pickles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from api.inspection import InspectionError, inspect_npz
from tests.api import builders


def _npz(tmp_path: Path, arrays: dict[str, np.ndarray]) -> Path:
    path = tmp_path / "up-staged"
    path.write_bytes(builders.npz_bytes(arrays))
    return path


def test_fields_samples_and_numeric_classes(tmp_path: Path) -> None:
    meta = inspect_npz(_npz(tmp_path, {"x": np.zeros((6, 2, 3), np.float16), "labels": np.array([3, 1, 1, 10, 3, 1])}))
    assert meta == {
        "num_samples": 6,
        "fields": {"x": {"dtype": "float16", "shape": [6, 2, 3]}, "labels": {"dtype": "int64", "shape": [6]}},
        "classes": ["1", "3", "10"],
    }


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"x": np.ones((2, 2)), "labels": np.ones((2, 2), np.int64)}, "one-dimensional"),
        ({"x": np.ones((2, 2)), "labels": np.array([0.5, 1.5])}, "integers or strings"),
        ({}, "holds no arrays"),
    ],
)
def test_refusals(tmp_path: Path, arrays: dict[str, np.ndarray], needle: str) -> None:
    with pytest.raises(InspectionError, match=needle):
        inspect_npz(_npz(tmp_path, arrays))


def test_a_single_npy_is_not_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "up-staged"
    with open(path, "wb") as fh:
        np.save(fh, np.arange(3))
    with pytest.raises(InspectionError, match=r"single \.npy array"):
        inspect_npz(path)


def test_a_zip_member_that_is_not_an_array(tmp_path: Path) -> None:
    path = tmp_path / "up-staged"
    path.write_bytes(builders.zip_bytes({"x.npy": builders.npz_bytes({}), "notes.txt": b"hi"}))
    with pytest.raises(InspectionError, match=r"is not a \.npy array|unreadable header"):
        inspect_npz(path)
