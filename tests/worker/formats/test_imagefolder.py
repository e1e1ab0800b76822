"""image-folder datasets: class folders of PNGs, resized and normalised NCHW under the model's input."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests import factories_train as f
from worker.core import StepFailed, WorkingModel
from worker.formats import imagefolder

MODEL = WorkingModel(form="torch", origin="onnx", input_names=["input"], output_names=["logits"])


def test_digits_zip_loads_with_labels_and_normalisation(tmp_path: Path) -> None:
    archive = f.digits_imagefolder(tmp_path / "d.zip", per_class=3)
    spec = f.spec(image={"size": 8, "mean": [0.5], "std": [0.25]})
    data = imagefolder.load(archive, {}, MODEL, spec, tmp_path / "w")
    x = data.inputs["input"]
    assert x.shape == (30, 1, 8, 8) and x.dtype == np.float32
    assert data.classes == [str(i) for i in range(10)]
    assert data.labels is not None
    assert sorted(np.bincount(data.labels).tolist()) == [3] * 10
    # pixels survive the round trip: undo the normalisation and compare with sklearn's digit of that class
    d = load_digits()
    first = int(np.flatnonzero(data.labels == 4)[0])
    restored = x[first, 0] * 0.25 + 0.5
    candidates = [d.images[i] / 16 for i in np.flatnonzero(d.target == 4)[:3]]
    assert min(np.abs(restored - c).max() for c in candidates) < 0.01


def test_resizes_to_rgb(tmp_path: Path) -> None:
    archive = f.digits_imagefolder(tmp_path / "d.zip", per_class=1)
    data = imagefolder.load(archive, {}, MODEL, f.spec(image={"size": 16}), tmp_path / "w")
    assert data.inputs["input"].shape == (10, 3, 16, 16)


def test_rejects_traversal_and_empty(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../x/0.png", b"")
    with pytest.raises(StepFailed):
        imagefolder.load(bad, {}, MODEL, f.spec(), tmp_path / "w")
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("a/readme.txt", "hi")
    with pytest.raises(StepFailed, match="no class folders"):
        imagefolder.load(empty, {}, MODEL, f.spec(), tmp_path / "w2")
