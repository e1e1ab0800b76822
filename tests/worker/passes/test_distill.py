"""DistillPass: a layer-dropped BERT student keeps k evenly spaced teacher layers; distilling a pruned CNN
from its unpruned teacher beats the pruned-only model; feature-extraction students match embeddings; a causal-LM student keeps the teacher's most important layers
(never one made an identity) and distillation lowers its eval loss; the LM loss mixes token KL and LM loss."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.spec import DistillStep, FinetuneStep, PruneStep
from tests import factories_lmtrain as lt
from tests import factories_train as f
from tests.factories_lm import licence_paragraphs, prompt_rows, tiny_lm_dir
from worker import convert, metrics, torch_utils
from worker.core import StepFailed, WorkingModel
from worker.formats import hf, text
from worker.lm import importance
from worker.lm.objectives import eval_loss, token_kd
from worker.passes.distill import DistillPass, kd_loss, kept_layers, lm_kd_loss
from worker.passes.finetune import FinetunePass
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


# --- causal LMs: token-level KD into the teacher's most important layers ---------------------------------------


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A tiny 4-layer Llama trained on GPL-3 text whose layer 1 is then made an identity, saved with its tokenizer."""
    tmp = tmp_path_factory.mktemp("teacher")
    path, tok = lt.tiny_lm(tmp / "init", layers=4)
    gpl = licence_paragraphs(("GPL-3",))
    ctx = f.MemoryContext(tmp, f.spec("text-generation"), data={"train": lt.token_dataset(tok, gpl[:48], 48)})
    step = FinetuneStep(type="finetune", mode="full", epochs=3, batch_size=8, lr=1e-2)
    module = FinetunePass().run(lt.lm_model(path), step, ctx).model.module
    lt.make_identity(module, [1])
    module.save_pretrained(tmp / "teacher")
    tok.save_pretrained(tmp / "teacher")
    return tmp / "teacher", tok


def test_lm_kd_loss_mixes_token_kl_and_lm_loss(lm_teacher: tuple[Path, Any]) -> None:
    path, tok = lm_teacher
    teacher = lt.lm_model(path).module
    student = importance.keep_layers(lt.lm_model(path).module, [0, 3])
    data = lt.prompt_dataset(tok, prompt_rows(4), 32)
    batch = {k: torch.from_numpy(v) for k, v in data.inputs.items()}
    batch["labels"] = torch.from_numpy(data.labels)  # type: ignore[arg-type]

    def loss(s: torch.nn.Module, **kw: Any) -> float:
        with torch.no_grad():
            return float(lm_kd_loss(s, teacher, DistillStep(type="distill", **kw))(batch))

    assert loss(copy.deepcopy(teacher), alpha=1.0) == pytest.approx(0.0, abs=1e-6)  # the teacher itself
    with torch.no_grad():
        out = student(**batch)
        kl = float(token_kd(out.logits, teacher(**data_inputs(batch)).logits, batch["attention_mask"], 2.0))
    assert kl > 0
    assert loss(student, alpha=1.0, temperature=2.0) == pytest.approx(kl, rel=1e-5)
    assert loss(student, alpha=0.0) == pytest.approx(float(out.loss), rel=1e-5)  # LM loss on the completion only
    mixed = loss(student, alpha=0.25, temperature=2.0)
    assert mixed == pytest.approx(0.25 * kl + 0.75 * float(out.loss), rel=1e-5)


def data_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def test_lm_student_keeps_the_important_layers_and_learns(lm_teacher: tuple[Path, Any], tmp_path: Path) -> None:
    path, tok = lm_teacher
    gpl = licence_paragraphs(("GPL-3",))
    evald = lt.token_dataset(tok, gpl[80:], 48)
    ctx = f.MemoryContext(tmp_path, f.spec("text-generation"),
                          data={"train": lt.token_dataset(tok, gpl[:48], 48), "eval": evald},
                          models={"input": lambda: lt.lm_model(path)})
    step = DistillStep(type="distill", teacher="input", student={"layers": 2}, epochs=2, batch_size=8, lr=5e-3)
    result = DistillPass().run(lt.lm_model(path), step, ctx)
    m = result.metrics
    scores, kept = m["layer_scores"], m["student_layers"]
    print("layer scores", [round(s, 4) for s in scores], "kept", kept)
    assert scores[1] == pytest.approx(0.0, abs=1e-9) and 1 not in kept  # the identity layer goes first
    assert kept == importance.most_important(scores, 2)
    assert min(scores[i] for i in kept) >= max(s for i, s in enumerate(scores) if i not in kept)

    student = result.model.module
    assert len(importance.decoder_layers(student)) == 2 and student.config.num_hidden_layers == 2
    assert m["student_params"] < m["teacher_params"]
    print(f"student eval loss {m['student_eval_loss_before']:.3f} -> {m['student_eval_loss_after']:.3f} "
          f"(teacher {m['teacher_eval_loss']:.3f})")
    assert m["student_eval_loss_after"] < m["student_eval_loss_before"] - 0.02
    assert eval_loss(student, evald, "cpu")["eval_loss"] == pytest.approx(m["student_eval_loss_after"], rel=1e-6)
    assert all({"loss", "eval_metric", "eval_loss", "perplexity"} <= set(c) for c in result.curve)
    assert any(e["kind"] == "log" and e.get("kept") == kept for e in ctx.events)


def test_lm_distill_refuses_another_tokenizer(lm_teacher: tuple[Path, Any], tmp_path: Path) -> None:
    path, tok = lm_teacher
    other = tiny_lm_dir(tmp_path / "other", layers=1, tokenizer=False)  # a model without the tokenizer ...
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(other)
    config.vocab_size = 200  # ... and a smaller vocabulary
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    data = lt.token_dataset(tok, licence_paragraphs(("GPL-3",))[:4], 24)
    ctx = f.MemoryContext(tmp_path, f.spec("text-generation"), data={"train": data},
                          models={"input": lambda: lt.lm_model(path), "small": lambda: lt.lm_model(other)})
    step = DistillStep(type="distill", teacher="input", student={"model": "small"}, epochs=1)
    with pytest.raises(StepFailed, match="same tokenizer") as err:
        DistillPass().run(lt.lm_model(path), step, ctx)
    assert err.value.code == "tokenizer_mismatch"


def test_distill_until_stops_once_the_budget_holds_on_a_split_of_train(tmp_path: Path) -> None:
    path, input_acc = f.cnn_onnx()
    train, evald = f.digits()
    roles: list[str] = []

    class Recording(f.MemoryContext):
        def dataset(self, role: str, model: WorkingModel) -> Any:
            roles.append(role)
            return super().dataset(role, model)

    ctx = Recording(
        tmp_path, f.spec(), data={"train": train, "eval": evald}, models={"input": lambda: f.onnx_model(path)}
    )
    pruned = PrunePass().run(convert.to_torch(f.onnx_model(path), ctx), PruneStep(type="prune", ratio=0.5), ctx)
    roles.clear()
    step = DistillStep(type="distill", batch_size=32, lr=3e-3, until={"max_accuracy_drop": 0.06}, max_epochs=10)
    result = DistillPass().run(pruned.model, step, ctx)
    m = result.metrics
    print(m["budget"], m["epochs_run"])
    assert roles == ["train"]  # the eval set is never read
    assert m["budget_held"] is True and m["epochs_run"] < 10 and m["metric"] == "accuracy"
    assert m["budget"]["best_validation_accuracy"] >= m["budget"]["threshold"]
    assert m["teacher_metrics"]["accuracy"] == pytest.approx(m["budget"]["reference_accuracy"])
    acc = metrics.torch_metric(result.model, evald, ctx.spec)["accuracy"]
    assert acc >= input_acc - 0.08
