"""worker.metrics: accuracy and cosine fidelity, and the task metric of a torch-form model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import factories_train as f
from worker import convert, metrics, torch_utils


def test_accuracy_and_cosine_fidelity() -> None:
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert metrics.accuracy(logits, np.array([0, 1, 1, 1])) == 0.75
    assert metrics.cosine_fidelity(logits, 3 * logits) == pytest.approx(1.0)
    assert metrics.cosine_fidelity(logits, -logits) == pytest.approx(-1.0)


def test_feature_metric_is_cosine_fidelity(tmp_path: Path) -> None:
    path, _ = f.cnn_onnx()
    _, evald = f.digits()
    ctx = f.MemoryContext(tmp_path, f.spec("feature-extraction"), data={"eval": evald})
    model = convert.to_torch(f.onnx_model(path), ctx)
    ref = torch_utils.predict(torch_utils.interface(model), evald, ["input"], "cpu")
    got = metrics.torch_metric(model, evald, ctx.spec, reference=ref)
    assert "accuracy" not in got
    assert got["fidelity"] == pytest.approx(1.0, abs=1e-6)
    noisy = metrics.torch_metric(
        model, evald, ctx.spec, reference=ref + np.random.default_rng(0).normal(size=ref.shape)
    )
    assert noisy["fidelity"] < 0.99


@pytest.mark.parametrize(("task", "measured"), [("generic", True), ("image-classification", True),
                                                ("feature-extraction", False)])
def test_accuracy_is_measured_for_the_accuracy_tasks(tmp_path: Path, task: str, measured: bool) -> None:
    path, acc = f.cnn_onnx()
    _, evald = f.digits()
    ctx = f.MemoryContext(tmp_path, f.spec(task), data={"eval": evald})
    got = metrics.torch_metric(convert.to_torch(f.onnx_model(path), ctx), evald, ctx.spec)
    assert ("accuracy" in got) is measured
    if measured:
        assert got["accuracy"] == pytest.approx(acc, abs=0.002)
