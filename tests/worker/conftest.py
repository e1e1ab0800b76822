"""Worker fixtures: the digits MLP trained once per test session, and its npz data sets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from models.spec import JobSpec
from tests.factories import digits_split, train_digits_mlp_onnx, write_npz
from worker.context import LocalContext


@dataclass(frozen=True)
class DigitsFiles:
    """A trained digits MLP as ONNX and its train / eval npz files."""

    model: Path
    train: Path
    eval: Path
    torch_accuracy: float

    def context(self, workdir: Path, spec: JobSpec, cls: type[LocalContext] = LocalContext) -> LocalContext:
        """A CPU context serving the model as ``mdl_mlp`` and the data as ``ds_train`` / ``ds_eval``."""
        return cls(
            workdir,
            spec,
            models={"mdl_mlp": (self.model, "onnx", {})},
            datasets={"ds_train": (self.train, "npz", {}), "ds_eval": (self.eval, "npz", {})},
            device="cpu",
        )


@pytest.fixture(scope="session")
def digits_mlp(tmp_path_factory: pytest.TempPathFactory) -> DigitsFiles:
    """The digits MLP (ONNX, dynamic batch) with train/eval npz, built once per session."""
    root = tmp_path_factory.mktemp("digits")
    (x_tr, y_tr), (x_ev, y_ev) = digits_split()
    acc = train_digits_mlp_onnx(root / "upload" / "mlp.onnx")
    assert acc >= 0.9, f"the digits MLP trained to only {acc:.3f}"
    return DigitsFiles(
        model=root / "upload" / "mlp.onnx",
        train=write_npz(root / "train.npz", x_tr, y_tr),
        eval=write_npz(root / "eval.npz", x_ev, y_ev),
        torch_accuracy=acc,
    )
