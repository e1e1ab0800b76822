"""Shared test helpers: the digits data set, npz files, and a small trained MLP exported to ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DIGITS_INPUT = "pixels"
DIGITS_OUTPUT = "logits"


def digits_split(
    test_size: float = 0.3, seed: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """sklearn's digits as float32 in [0, 1], fixed stratified split: ``(x_train, y_train), (x_eval, y_eval)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    x_tr, x_ev, y_tr, y_ev = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return (x_tr, y_tr), (x_ev, y_ev)


def write_npz(path: Path, x: np.ndarray, y: np.ndarray | None, input_name: str = DIGITS_INPUT) -> Path:
    """An npz dataset: ``x`` under the model's input name, ``y`` (when given) as ``labels``."""
    arrays = {input_name: x}
    if y is not None:
        arrays["labels"] = y
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def train_digits_mlp_onnx(path: Path, hidden: int = 256, epochs: int = 150, seed: int = 0) -> float:
    """Train a 64-hidden-hidden-10 MLP on digits (a few seconds), export it to ``path``; returns eval accuracy.

    The weights dominate the file, so INT8 quantization shrinks it by about 4x. Dynamic batch axis.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend with the other test processes
    try:
        return _train_and_export(torch, path, hidden, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train_and_export(torch: Any, path: Path, hidden: int, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    (x_tr, y_tr), (x_ev, y_ev) = digits_split()
    model = torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs // 10):
        perm = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), 128):
            idx = perm[start : start + 128]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_ev)).argmax(1).numpy() == y_ev).mean())
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, torch.zeros(1, 64), path)
    return acc


def export_onnx(model: Any, example: Any, path: Path, opset: int = 17) -> None:
    """Export with a dynamic batch axis (legacy exporter; the dynamo one where it is gone)."""
    import torch

    names: dict[str, Any] = {
        "input_names": [DIGITS_INPUT],
        "output_names": [DIGITS_OUTPUT],
        "opset_version": opset,
    }
    try:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            dynamic_axes={DIGITS_INPUT: {0: "batch"}, DIGITS_OUTPUT: {0: "batch"}},
            **names,
        )
    except TypeError:
        batch = torch.export.Dim("batch")
        torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=({0: batch},), **names)
