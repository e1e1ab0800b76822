"""A multi-task model measured per task: finetune(tasks) -> quantize on the digits CNN reports each task's accuracy
through its own output after quantization, and the budget holds on every task, naming the one that broke it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from models.search_space import meets
from models.spec import JobSpec
from tests import factories_train as f
from worker import pipeline
from worker.context import LocalContext
from worker.task_eval import budget


def _files(tmp_path: Path) -> dict[str, tuple[Path, str, dict[str, Any]]]:
    train, evald = f.digits()
    xs, ys, xe, ye = train.inputs["input"], train.labels, evald.inputs["input"], evald.labels
    assert ys is not None and ye is not None
    sets = {  # digit: trained on shifted labels (y+1 mod 10) but measured on the true ones: it breaks
        "digit-tr": (xs, (ys + 1) % 10), "digit-ev": (xe[:300], ye[:300]),
        "parity-tr": (xs[:400], ys[:400] % 2), "parity-ev": (xe[:300], ye[:300] % 2),
    }
    out = {}
    for name, (x, y) in sets.items():
        np.savez(tmp_path / f"{name}.npz", input=x, labels=y)
        out[name] = (tmp_path / f"{name}.npz", "npz", {})
    return out


def test_finetune_tasks_then_static_quantize_measures_every_task_and_the_worst_breaks_the_budget(
        tmp_path: Path) -> None:
    model_path, _ = f.cnn_onnx()
    spec = JobSpec.model_validate({  # no top-level data: the first task's train rows calibrate the static INT8
        "model": "m", "task": "image-classification",
        "steps": [{"type": "finetune", "epochs": 2, "batch_size": 64, "lr": 1e-2, "tasks": [
            {"name": n, "data": {"train": f"{n}-tr", "eval": f"{n}-ev"}, "weight": w}
            for n, w in (("digit", 10.0), ("parity", 1.0))]},
                  {"type": "quantize", "mode": "static", "calibration": {"samples": 64}}],
        "evaluate": {"metrics": ["accuracy", "size"], "max_accuracy_drop": 0.3},
    })
    ctx = LocalContext(tmp_path / "work", spec, models={"m": (model_path, "onnx", {})}, datasets=_files(tmp_path),
                       device="cpu")
    result = pipeline.run(spec, ctx)
    report = result.report
    measured = {r["task"]: r for r in report["output"]["tasks"]}
    judged = {r["task"]: r for r in report["budget"]["tasks"]}
    print(measured, report["budget"])
    # each task's accuracy through its own output of the quantized file, as ORT gives it by hand
    _, evald = f.digits()
    xe, ye = evald.inputs["input"][:300], evald.labels[:300]  # type: ignore[index]
    out = ort.InferenceSession(str(result.output_path), providers=["CPUExecutionProvider"]).run(None, {"input": xe})
    assert measured["digit"]["accuracy"] == pytest.approx(float((out[0].argmax(1) == ye).mean()))
    assert measured["parity"]["accuracy"] == pytest.approx(float((out[1].argmax(1) == ye % 2).mean()))
    assert measured["parity"]["output"] == "logits_parity" and measured["parity"]["eval_rows"] == 300
    # digit's reference is the input's own head on its rows; parity's the multi-task step's float export
    assert judged["digit"]["reference_from"] == "input" and judged["digit"]["reference"] > 0.9
    assert judged["parity"]["reference_from"].startswith("steps.0 (finetune")
    assert judged["parity"]["met"] and judged["parity"]["accuracy_drop"] < 0.3
    assert not judged["digit"]["met"] and judged["digit"]["accuracy_drop"] > 0.3
    b = report["budget"]
    assert not b["met"] and b["task"] == "digit" and b["accuracy_drop"] == judged["digit"]["accuracy_drop"]
    assert b["reason"].startswith("task 'digit': accuracy fell")
    assert report["steps"][-1]["eval"]["tasks"] == report["output"]["tasks"]
    # a search judges a trial on the same budget: the worst task decides, and its miss names it
    (miss,) = meets({"max_accuracy_drop": 0.3}, report, "image-classification")
    assert miss.startswith("quality: accuracy drop") and "on task 'digit'" in miss


def test_the_budget_holds_on_every_task_and_names_the_worst() -> None:
    spec = JobSpec.model_validate({"model": "m", "evaluate": {"max_accuracy_drop": 0.02}})
    steps = [{"index": 0, "label": "finetune (full, 3 tasks)", "metrics": {"multitask": {"tasks": [
        {"task": "a", "before": 0.9, "after": 0.95, "head_from_input": True},
        {"task": "b", "before": 0.5, "after": 0.8, "head_from_input": False},
        {"task": "c", "before": 0.5, "after": 0.7, "head_from_input": False}]}}}]
    measured = [{"task": "a", "accuracy": 0.89}, {"task": "b", "accuracy": 0.75}, {"task": "c", "accuracy": None}]
    b = budget(spec, {"met": True, "accuracy_drop": -0.05, "max_accuracy_drop": 0.02}, measured, steps)
    rows = {r["task"]: r for r in b["tasks"]}
    assert rows["a"]["reference"] == 0.9 and rows["a"]["met"]  # from the input: 1 point lost
    assert rows["b"]["reference"] == 0.8 and not rows["b"]["met"]  # from the step: 5 points lost
    assert rows["c"]["accuracy_drop"] is None and not rows["c"]["met"]
    assert b["accuracy_drop"] == pytest.approx(0.05) and not b["met"] and b["task"] == "c"
    assert "task 'b': accuracy fell 5.00 points" in b["reason"] and "task 'c': accuracy could not" in b["reason"]
    ok = budget(spec, {"met": True}, measured[:1], steps)
    assert ok["met"] and ok["task"] == "a" and "reason" not in ok
