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


def test_labels_are_streamed_not_loaded(tmp_path: Path) -> None:
    """A 32 MB labels array is inspected with a few MiB of memory (it used to be loaded whole, then copied)."""
    import tracemalloc

    n = 4_000_000
    path = tmp_path / "up-big"
    np.savez(path.with_suffix(".npz"), x=np.zeros((n, 1), np.int8), labels=np.arange(n, dtype=np.int64) % 7)
    path.with_suffix(".npz").rename(path)
    tracemalloc.start()
    try:
        meta = inspect_npz(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert meta["num_samples"] == n and meta["classes"] == [str(i) for i in range(7)]
    assert peak < 16 * 1024**2, f"inspection peaked at {peak / 1024**2:.1f} MiB for {n * 8 / 1024**2:.0f} MiB of labels"


def test_truncated_labels_are_a_clear_refusal(tmp_path: Path) -> None:
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False, "shape": (10,)})
    path = tmp_path / "up-cut"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("labels.npy", header.getvalue() + np.arange(5, dtype="<i8").tobytes())
    with pytest.raises(InspectionError, match="'labels' is truncated: 5 of 10 values"):
        inspect_npz(path)
