"""DistillPass: a layer-dropped BERT student keeps k evenly spaced teacher layers; distilling a pruned CNN
from its unpruned teacher beats the pruned-only model; feature-extraction students match embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.spec import DistillStep, PruneStep
from tests import factories_train as f
from worker import convert, metrics, torch_utils
from worker.formats import hf, text
from worker.passes.base import WorkingModel
from worker.passes.distill import DistillPass, kd_loss, kept_layers
from worker.passes.prune import PrunePass


def test_kept_layers_are_evenly_spaced() -> None:
    assert kept_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert kept_layers(4, 2) == [0, 3]
    assert kept_layers(4, 1) == [3]


def test_kd_loss_is_zero_for_identical_logits_and_scales_with_t2() -> None:
    t = torch.randn(8, 5)
    assert float(kd_loss(t, t, 4.0)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(8, 5)
    assert float(kd_loss(s, t, 2.0)) > 0


def test_distill_pruned_cnn_beats_pruned_only(tmp_path: Path) -> None:
    path, input_acc = f.cnn_onnx()
    train, evald = f.digits()
    ctx = f.MemoryContext(
        tmp_path, f.spec(), data={"train": train, "eval": evald}, models={"input": lambda: f.onnx_model(path)}
    )
    model = convert.to_torch(f.onnx_model(path), ctx)
    pruned = PrunePass().run(model, PruneStep(type="prune", ratio=0.5), ctx)
    pruned_acc = pruned.metrics["accuracy_after_prune"]
    step = DistillStep(type="distill", epochs=4, batch_size=32, lr=3e-3, temperature=4.0, alpha=0.5)
    result = DistillPass().run(pruned.model, step, ctx)
    acc = metrics.torch_metric(result.model, evald, ctx.spec)["accuracy"]
    print(f"teacher {input_acc:.3f} pruned {pruned_acc:.3f} distilled {acc:.3f}")
    assert acc > pruned_acc + 0.3 and acc >= 0.8
    assert result.metrics["student_params"] < 0.6 * result.metrics["teacher_params"]
    assert result.metrics["teacher_metrics"]["accuracy"] == pytest.approx(input_acc, abs=0.002)
    assert [c["epoch"] for c in result.curve] == [1, 2, 3, 4]
    assert any(e.get("phase") == "distilling epoch 4/4" for e in ctx.events)


def _bert_ctx(tmp_path: Path, task: str, init: float = 0.02) -> tuple[f.MemoryContext, WorkingModel]:
    archive = f.tiny_bert_archive(tmp_path, task=task, init=init)
    load = lambda: hf.load(archive, {}, tmp_path / "work")  # noqa: E731
    model = load()
    spec = f.spec(task, text={"max_length": 16})
    train = text.load(
        f.write_jsonl(tmp_path / "train.jsonl", f.sentences(120, seed=1)), {}, model, spec, tmp_path
    )
    evald = text.load(
        f.write_jsonl(tmp_path / "eval.jsonl", f.sentences(30, seed=2)), {}, model, spec, tmp_path
    )
    return f.MemoryContext(
        tmp_path, spec, data={"train": train, "eval": evald}, models={"input": load}
    ), model


def test_layer_dropped_student_has_k_layers(tmp_path: Path) -> None:
    ctx, model = _bert_ctx(tmp_path, "text-classification")
    step = DistillStep(type="distill", student={"layers": 2}, epochs=1, batch_size=32, hidden_weight=1.0)
    result = DistillPass().run(model, step, ctx)
    student = result.model.module
    assert len(student.bert.encoder.layer) == 2 and student.config.num_hidden_layers == 2
    assert result.metrics["student_layers"] == [0, 3]
    assert result.metrics["student_params"] < result.metrics["teacher_params"]
    out = torch_utils.predict(torch_utils.interface(result.model), ctx.data["eval"], model.input_names, "cpu")
    assert out.shape == (30, 3)
    exported = convert.to_onnx(result.model, ctx, 17, name="student")
    assert exported.meta["parity"]["max_abs_diff"] < 1e-3


def test_feature_extraction_student_moves_towards_teacher(tmp_path: Path) -> None:
    ctx, model = _bert_ctx(tmp_path, "feature-extraction", init=0.5)  # layers that matter
    assert model.output_names == ["last_hidden_state"]
    step = DistillStep(type="distill", student={"layers": 1}, epochs=3, batch_size=16, lr=3e-3)
    result = DistillPass().run(model, step, ctx)
    before = result.metrics["student_metrics_before"]["fidelity"]
    after = result.metrics["student_metrics_after"]["fidelity"]
    assert result.metrics["metric"] == "fidelity"
    assert after > before and np.isfinite(after)


def test_current_teacher_is_the_working_model_not_the_input(tmp_path: Path) -> None:
    """teacher "current": what earlier steps made (here: the input with a zeroed classifier) teaches."""
    ctx, model = _bert_ctx(tmp_path, "text-classification")
    with torch.no_grad():
        model.module.classifier.weight.zero_()
        model.module.classifier.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))  # the working model always says 0
    step = DistillStep(type="distill", teacher="current", student={"layers": 2}, epochs=1, batch_size=32)
    result = DistillPass().run(model, step, ctx)
    assert result.metrics["teacher"] == "current"
    teacher_out = torch_utils.predict(torch_utils.interface(model), ctx.data["eval"], model.input_names, "cpu")
    assert (teacher_out.argmax(1) == 0).all()  # the working model itself was not trained or replaced
    assert result.metrics["teacher_metrics"]["accuracy"] == pytest.approx(
        float((ctx.data["eval"].labels == 0).mean()), abs=1e-6
    )
