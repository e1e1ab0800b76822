"""The training passes inside the real pipeline over LocalContext: an ONNX residual CNN on digits through
prune -> distill -> quantize, and a tiny BERT (hf upload) through LoRA -> distill(layers: 2) -> dynamic INT8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from models.spec import JobSpec
from tests import factories_train as f
from worker import pipeline
from worker.context import LocalContext


def _npz(path: Path, data: f.ArrayDataset) -> Path:
    np.savez(path, input=data.inputs["input"], labels=data.labels)  # type: ignore[arg-type]
    return path


def test_onnx_cnn_prune_distill_quantize(tmp_path: Path) -> None:
    model_path, _ = f.cnn_onnx()
    train, evald = f.digits()
    spec = JobSpec.model_validate(
        {
            "model": "m",
            "task": "image-classification",
            "data": {"train": "tr", "eval": "ev"},
            "steps": [
                {"type": "prune", "method": "structured", "ratio": 0.5},
                {"type": "distill", "epochs": 4, "lr": 3e-3},
                {"type": "quantize", "mode": "static", "calibration": {"samples": 64}},
            ],
            "evaluate": {"latency": {"runs": 3, "warmup": 1}},
        }
    )
    ctx = LocalContext(
        tmp_path / "work",
        spec,
        models={"m": (model_path, "onnx", {})},
        datasets={
            "tr": (_npz(tmp_path / "tr.npz", train), "npz", {}),
            "ev": (_npz(tmp_path / "ev.npz", evald), "npz", {}),
        },
        device="cpu",
    )
    result = pipeline.run(spec, ctx)
    report = result.report
    steps = report["steps"]
    prune_m = steps[0]["metrics"]
    print(
        "params", prune_m["params_before"], "->", prune_m["params_after"],
        "acc input", report["input"].get("accuracy"), "pruned", steps[0]["eval"].get("accuracy"),
        "distilled", steps[1]["eval"].get("accuracy"), "output", report["output"].get("accuracy"),
        "size ratio", report["gains"]["size_ratio"],
    )  # fmt: skip
    assert prune_m["params_after"] < 0.6 * prune_m["params_before"]
    assert steps[1]["eval"]["accuracy"] > steps[0]["eval"]["accuracy"] + 0.3
    assert report["output"]["accuracy"] >= 0.8
    assert any(e.get("phase") == "distilling epoch 4/4" for e in ctx.events if e["kind"] == "progress")
    onnx.checker.check_model(onnx.load(str(result.output_path)))


def test_bert_lora_then_layer_distill_then_dynamic_int8(tmp_path: Path) -> None:
    archive = f.tiny_bert_archive(tmp_path)
    train = f.write_jsonl(tmp_path / "train.jsonl", f.sentences(240, seed=1))
    evald = f.write_jsonl(tmp_path / "eval.jsonl", f.sentences(60, seed=2))
    spec = JobSpec.model_validate(
        {
            "model": "b",
            "task": "text-classification",
            "data": {"train": "tr", "eval": "ev"},
            "text": {"max_length": 16},
            "steps": [
                {"type": "finetune", "mode": "lora", "epochs": 3, "batch_size": 16, "lr": 5e-3},
                {"type": "distill", "student": {"layers": 2}, "epochs": 3, "batch_size": 16, "lr": 3e-3},
                {"type": "quantize", "mode": "dynamic"},
            ],
            "evaluate": {"latency": {"runs": 3, "warmup": 1}},
        }
    )
    ctx = LocalContext(
        tmp_path / "work",
        spec,
        models={"b": (archive, "hf", {})},
        datasets={"tr": (train, "text", {}), "ev": (evald, "text", {})},
        device="cpu",
    )
    result = pipeline.run(spec, ctx)
    steps = result.report["steps"]
    assert steps[1]["metrics"]["student_layers"] == [0, 3]
    graph = onnx.load(str(result.output_path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert result.report["output"].get("accuracy") is not None
