"""The README's walkthrough (prune 0.5 -> distill -> static INT8) on CNNs as people export them.

Today's ``torch.onnx.export(net, (x,), "model.onnx")`` (the dynamo exporter: ``model.onnx`` + ``model.onnx.data``,
shapes written as constants, ReduceMean for a global pool) and the TorchScript one (``dynamo=False``), on four
shapes: plain, residual, depthwise-separable, AdaptiveAvgPool -> Flatten. Tiny nets and few samples: each export
takes seconds, the pipeline a few more.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from models.spec import JobSpec
from tests.factories import write_npz
from tests.factories_train import digits
from worker import pipeline
from worker.context import LocalContext


def _plain() -> Any:
    from torch import nn

    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def _residual() -> Any:
    import torch
    from torch import nn

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.head = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.stem(x)
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(a + self.block(a), 1), 1))

    return Residual()


def _depthwise() -> Any:
    from torch import nn

    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 32, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def _pool_flatten() -> Any:
    """AdaptiveAvgPool to 2x2, then Flatten: the Linear reads channels x 4 (a reshape that is not after a 1x1 pool)."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))


SHAPES: dict[str, Callable[[], Any]] = {"plain": _plain, "residual": _residual, "depthwise": _depthwise,
                                        "pool_flatten": _pool_flatten}


def _export(net: Any, folder: Path, dynamo: bool, dynamic_batch: bool = False) -> Path:
    """As the README says: ``torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), "model.onnx")`` (batch 1, static);
    with ``dynamic_batch`` a batch axis too."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    extra: dict[str, Any] = {}
    if dynamic_batch:
        extra = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=4096)},)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.zeros(2 if dynamic_batch else 1, 1, 8, 8),), str(path),
                          dynamo=dynamo, **extra)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    train, evald = digits()
    (x,) = train.inputs.values()
    (xe,) = evald.inputs.values()
    assert train.labels is not None and evald.labels is not None
    return x[:256], train.labels[:256], xe[:96], evald.labels[:96]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_readme_walkthrough_runs_on_cnns_exported_either_way(
    tmp_path: Path, data: tuple[np.ndarray, ...], shape: str, dynamo: bool
) -> None:
    import torch

    torch.manual_seed(0)
    model_path = _export(SHAPES[shape](), tmp_path / "export", dynamo)
    proto = onnx.load(str(model_path), load_external_data=False)
    (name,) = [i.name for i in proto.graph.input]
    x, y, xe, ye = data
    train = write_npz(tmp_path / "train.npz", x, y, input_name=name)
    evald = write_npz(tmp_path / "eval.npz", xe, ye, input_name=name)
    spec = JobSpec.model_validate({
        "model": "mdl_cnn", "task": "image-classification", "data": {"train": "ds_train", "eval": "ds_eval"},
        "steps": [{"type": "prune", "method": "structured", "ratio": 0.5}, {"type": "distill", "epochs": 1},
                  {"type": "quantize", "mode": "static", "calibration": {"samples": 32}}],
        "evaluate": {"latency": {"warmup": 1, "runs": 5}}, "cache": False,
    })
    ctx = LocalContext(tmp_path / "work", spec, models={"mdl_cnn": (model_path, "onnx", {})},
                       datasets={"ds_train": (train, "npz", {}), "ds_eval": (evald, "npz", {})}, device="cpu")
    report = pipeline.run(spec, ctx).report
    assert report["pipeline"][0].startswith("prune")
    assert report["output"]["params"] < 0.5 * report["input"]["params"], (report["input"]["params"],
                                                                          report["output"]["params"])
    assert report["output"]["num_samples"] == 96 and report["output"]["accuracy"] is not None


def test_a_fixed_shape_pruning_contradicts_is_a_named_error_saying_what_to_do(
    tmp_path: Path, data: tuple[np.ndarray, ...]
) -> None:
    """A split of the channels into fixed groups (written as the constant [8, 24]) is not a flatten and keeps its
    sizes: pruning the convolution before it fails as ``shape_constrained`` with the ways out, not as PyTorch's raw
    text ("split_with_sizes expects split_sizes to sum exactly to ...")."""
    import torch
    from torch import nn

    from worker.stages import StepError

    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 32, 3, padding=1)
            self.mid = nn.Conv2d(24, 16, 3, padding=1)
            self.head = nn.Linear(24, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = torch.split(torch.relu(self.conv(x)), [8, 24], dim=1)
            return self.head(torch.cat([a.mean((2, 3)), torch.relu(self.mid(b)).mean((2, 3))], 1))

    torch.manual_seed(0)
    model_path = _export(Grouped(), tmp_path / "export", dynamo=True, dynamic_batch=True)
    (name,) = [i.name for i in onnx.load(str(model_path), load_external_data=False).graph.input]
    _, _, xe, ye = data
    evald = write_npz(tmp_path / "eval.npz", xe, ye, input_name=name)
    spec = JobSpec.model_validate({"model": "mdl_cnn", "task": "image-classification", "data": {"eval": "ds_eval"},
                                   "steps": [{"type": "prune", "method": "structured", "ratio": 0.5}],
                                   "cache": False})
    ctx = LocalContext(tmp_path / "work", spec, models={"mdl_cnn": (model_path, "onnx", {})},
                       datasets={"ds_eval": (evald, "npz", {})}, device="cpu")
    with pytest.raises(StepError) as caught:
        pipeline.run(spec, ctx)
    assert caught.value.code == "shape_constrained" and caught.value.step == "steps[0] prune", caught.value.message
    assert "fixed shape" in caught.value.message and "dynamo=False" in caught.value.message
    assert "split_with_sizes" in caught.value.message  # what torch said, after what to do
    assert "format hf" in caught.value.message
