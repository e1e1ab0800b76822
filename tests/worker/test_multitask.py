"""Multi-task fine-tuning through the real pipeline over LocalContext: a digits CNN (ONNX upload) with three
tasks exports one ONNX file with one output per task and labels in its metadata; a tiny BERT learns two text tasks
on one backbone; a tiny Llama trains on two tasks' rows mixed, one of them few-shot choice rows
(label likelihood trained; zero-shot, in-context and fine-tuned accuracy reported); the sampling rules and the few-shot split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from models.spec import JobSpec
from tests import factories_train as f
from tests.factories_lm import licence_paragraphs, tiny_lm_archive
from worker import pipeline
from worker.context import LocalContext
from worker.core import ArrayDataset
from worker.passes.finetune import FinetunePass
from worker.passes.multitask import (
    METADATA_KEY,
    Task,
    in_context_tasks,
    mixing_probabilities,
    selection_mean,
    stratified_split,
)


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, input=x, labels=y)
    return path


def _digit_tasks(tmp_path: Path) -> dict[str, tuple[Path, str, dict[str, Any]]]:
    train, evald = f.digits()
    xs, ys = train.inputs["input"], train.labels
    xe, ye = evald.inputs["input"], evald.labels
    assert ys is not None and ye is not None
    files: dict[str, tuple[Path, str, dict[str, Any]]] = {}
    # digit identity (the input model's own head fits it), parity, and >= 5 with only 16 rows a class (few-shot)
    few = np.concatenate([np.flatnonzero(ys < 5)[:16], np.flatnonzero(ys >= 5)[:16]])
    for name, (x, y, xv, yv) in {
        "digit": (xs[:600], ys[:600], xe, ye),
        "parity": (xs, ys % 2, xe, ye % 2),
        "high": (xs[few], (ys[few] >= 5).astype(np.int64), xe, (ye >= 5).astype(np.int64)),
    }.items():
        files[f"{name}-tr"] = (_npz(tmp_path / f"{name}-tr.npz", x, y), "npz", {})
        files[f"{name}-ev"] = (_npz(tmp_path / f"{name}-ev.npz", xv, yv), "npz", {})
    return files


def _tasks(*names: str, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": n, "data": {"train": f"{n}-tr", "eval": f"{n}-ev"}, **extra} for n in names]


def test_cnn_three_tasks_one_onnx_with_an_output_per_task(tmp_path: Path) -> None:
    model_path, input_acc = f.cnn_onnx()
    spec = JobSpec.model_validate({
        "model": "m", "task": "image-classification",
        "steps": [{"type": "finetune", "mode": "full", "epochs": 5, "batch_size": 32, "lr": 3e-3,
                   "tasks": [*_tasks("digit", "parity"), {**_tasks("high")[0], "weight": 20.0}],
                   "sampling": "temperature", "temperature": 2.0}],
        "evaluate": {"latency": {"runs": 3, "warmup": 1}},
    })
    ctx = LocalContext(tmp_path / "work", spec, models={"m": (model_path, "onnx", {})},
                       datasets=_digit_tasks(tmp_path), device="cpu")
    result = pipeline.run(spec, ctx)
    step = result.report["steps"][0]
    mt = step["metrics"]["multitask"]
    rows = {r["task"]: r for r in mt["tasks"]}
    print({k: (r["before"], r["after"]) for k, r in rows.items()}, mt["size"])
    # the digit task starts from the input model's own head; parity and >=5 start from fresh heads
    assert rows["digit"]["head_from_input"] and rows["digit"]["before"] == pytest.approx(input_acc, abs=1e-6)
    assert not rows["parity"]["head_from_input"]
    assert rows["digit"]["after"] >= input_acc - 0.05
    assert rows["parity"]["after"] >= 0.9 and rows["parity"]["before"] < 0.75
    assert rows["high"]["few_shot"] and rows["high"]["validation_rows"] == 8
    # a fresh head's "before" is a random projection (0.44 on one CPU, 0.68 on another): only the trained
    # head's accuracy above the classes' balance (about 0.5) and above that random start is a stable claim
    assert rows["high"]["after"] >= 0.6 and rows["high"]["after"] > rows["high"]["before"]
    # the few-shot head was probed on the trained features; the step kept is at least as good on the carved split
    probe = rows["high"]["head_probe"]
    assert probe["validation"] >= probe["validation_before"] and 0 <= probe["steps"] <= 200
    assert "head_probe" not in rows["parity"]
    assert rows["parity"]["after"] == pytest.approx(rows["parity"]["after_torch"], abs=0.01)
    # temperature 2: (w n)^(1/2) -> the 24-row few-shot task (weight 20) gets far more than its 12/1812 share
    assert mt["probabilities"]["high"] > 0.15 and sum(r["batches"] for r in rows.values()) > 0
    # one backbone, three heads: about a third of three separate models
    assert 0.3 < mt["size"]["ratio"] < 0.4 and mt["size"]["separate_bytes"] > 2.5 * mt["size"]["shared_bytes"]
    assert {"loss[parity]", "accuracy[high]"} <= set(step["curve"][0])
    sess = ort.InferenceSession(str(result.output_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits_digit", "logits_parity", "logits_high"]
    described = json.loads(sess.get_modelmeta().custom_metadata_map[METADATA_KEY])
    assert [(d["output"], len(d["labels"])) for d in described] == [("logits_digit", 10), ("logits_parity", 2),
                                                                     ("logits_high", 2)]
    _, evald = f.digits()
    out = sess.run(["logits_parity"], {"input": evald.inputs["input"]})[0]
    assert out.shape == (len(evald), 2)
    assert float((out.argmax(1) == evald.labels % 2).mean()) == pytest.approx(rows["parity"]["after"])  # type: ignore[operator]


def test_bert_two_text_tasks_share_one_backbone(tmp_path: Path) -> None:
    archive = f.tiny_bert_archive(tmp_path)
    topic = [dict(r) for r in f.sentences(240, seed=1)]
    food = [{"text": r["text"], "label": "yes" if r["label"] == "food" else "no"} for r in f.sentences(240, seed=3)]
    files: dict[str, tuple[Path, str, dict[str, Any]]] = {
        "topic-tr": (f.write_jsonl(tmp_path / "t.jsonl", topic), "text", {}),
        "topic-ev": (f.write_jsonl(tmp_path / "te.jsonl", f.sentences(60, seed=2)), "text", {}),
        "food-tr": (f.write_jsonl(tmp_path / "f.jsonl", food), "text", {}),
        "food-ev": (f.write_jsonl(tmp_path / "fe.jsonl", [
            {"text": r["text"], "label": "yes" if r["label"] == "food" else "no"} for r in f.sentences(60, seed=4)
        ]), "text", {}),
    }
    spec = JobSpec.model_validate({
        "model": "b", "task": "text-classification", "text": {"max_length": 16},
        "steps": [{"type": "finetune", "mode": "full", "epochs": 4, "batch_size": 16, "lr": 2e-3,
                   "tasks": _tasks("topic", "food"), "sampling": "uniform"}],
        "evaluate": {"latency": {"runs": 3, "warmup": 1}},
    })
    ctx = LocalContext(tmp_path / "work", spec, models={"b": (archive, "hf", {})}, datasets=files, device="cpu")
    result = pipeline.run(spec, ctx)
    step = result.report["steps"][0]
    rows = {r["task"]: r for r in step["metrics"]["multitask"]["tasks"]}
    print({k: (r["before"], r["after"]) for k, r in rows.items()})
    # a tiny random-init BERT: both tasks far above chance (1/3 and the 2/3 majority) from one backbone
    assert rows["topic"]["after"] >= 0.6 and rows["food"]["after"] >= 0.9
    assert step["metrics"]["multitask"]["probabilities"] == {"topic": 0.5, "food": 0.5}
    sess = ort.InferenceSession(str(result.output_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits_topic", "logits_food"]
    described = json.loads(sess.get_modelmeta().custom_metadata_map[METADATA_KEY])
    assert described[1]["labels"] == ["no", "yes"]


def test_llama_mixed_rows_and_a_few_shot_choice_task(tmp_path: Path) -> None:
    archive = tiny_lm_archive(tmp_path)
    paras = licence_paragraphs(("GPL-3", "Apache-2.0"))
    gpl, apache = licence_paragraphs(("GPL-3",)), licence_paragraphs(("Apache-2.0",))

    def choice(rows: list[str], label: str) -> list[dict[str, str]]:
        return [{"text": p[:80], "label": label} for p in rows]

    few_train = choice(gpl[:10], "gpl") + choice(apache[:10], "apache")
    few_eval = choice(gpl[10:22], "gpl") + choice(apache[10:22], "apache")
    files: dict[str, tuple[Path, str, dict[str, Any]]] = {
        "lm-tr": (f.write_jsonl(tmp_path / "lm.jsonl", [{"text": p} for p in paras[:24]]), "text", {}),
        "lm-ev": (f.write_jsonl(tmp_path / "lme.jsonl", [{"text": p} for p in paras[40:52]]), "text", {}),
        "which-tr": (f.write_jsonl(tmp_path / "w.jsonl", few_train), "text", {}),
        "which-ev": (f.write_jsonl(tmp_path / "we.jsonl", few_eval), "text", {}),
    }
    spec = JobSpec.model_validate({
        "model": "lm", "task": "text-generation", "text": {"max_length": 40},
        "steps": [{"type": "finetune", "mode": "lora", "epochs": 4, "batch_size": 8, "lr": 1e-2,
                   "lora": {"r": 8, "alpha": 16}, "tasks": _tasks("lm", "which"), "sampling": "uniform"}],
    })
    ctx = LocalContext(tmp_path / "work", spec, models={"lm": (archive, "hf", {})}, datasets=files, device="cpu")
    result = FinetunePass().run(ctx.load_model("input"), spec.steps[0], ctx)  # type: ignore[arg-type]
    rows = {r["task"]: r for r in result.metrics["multitask"]["tasks"]}
    print(rows)
    which, lm = rows["which"], rows["lm"]
    assert which["few_shot"] and which["validation_rows"] >= 2 and lm["metric"] == "eval_loss"
    assert lm["eval_loss_after"] < lm["eval_loss_before"]
    # the label's likelihood after the text is what the choice task trains (a random-init LM this small does not
    # yet turn it into accuracy: bench.multitask measures that); the three accuracies are reported side by side
    assert which["eval_loss_after"] < which["eval_loss_before"] - 0.1
    for key in ("zero_shot", "in_context", "fine_tuned"):
        assert 0.0 <= which[key] <= 1.0
    assert which["in_context_shots"] == 4 and which["batches"] > 0
    assert result.metrics["multitask"]["size"]["ratio"] == pytest.approx(0.5)
    assert not any("lora" in k for k in result.model.module.state_dict())  # merged: a plain model to export
    assert {"loss[lm]", "eval_loss[which]", "accuracy[which]"} <= set(result.curve[0])


def test_the_best_epoch_weighs_each_task_by_its_selection_rows() -> None:
    def task(name: str, rows: int) -> Task:
        data = ArrayDataset({"x": np.zeros((rows, 1), np.float32)}, np.zeros(rows, np.int64))
        return Task(name, 1.0, data, data, ["0"])

    tasks = [task("big", 90), task("few", 10)]
    per_task = {"big": {"accuracy": 0.8}, "few": {"accuracy": 0.2}}
    assert selection_mean(per_task, tasks, "accuracy") == pytest.approx(0.74)  # the plain mean would be 0.5
    assert selection_mean({"big": {"accuracy": 0.8}}, tasks, "accuracy") == pytest.approx(0.8)
    assert selection_mean({}, tasks, "accuracy") is None


def test_in_context_is_measured_on_few_shot_choice_tasks_only() -> None:
    def task(name: str, few: bool, choice: bool) -> Task:
        data = ArrayDataset({"x": np.zeros((4, 1), np.float32)}, np.zeros(4, np.int64))
        rows = {"train": [{"text": "t", "label": "a"}], "eval": [{"text": "e", "label": "a"}]} if choice else {}
        return Task(name, 1.0, data, data, ["a"], validation=data if few else None, choice_rows=rows)

    tasks = [task("few", True, True), task("many", False, True), task("text", True, False)]
    assert [t.name for t in in_context_tasks(tasks)] == ["few"]


def test_sampling_rules() -> None:
    sizes, weights = [900, 100], [1.0, 1.0]
    assert mixing_probabilities(sizes, weights, "proportional") == pytest.approx([0.9, 0.1])
    assert mixing_probabilities(sizes, weights, "uniform") == pytest.approx([0.5, 0.5])
    assert mixing_probabilities(sizes, weights, "temperature", 2.0) == pytest.approx([30 / 40, 10 / 40])
    assert mixing_probabilities(sizes, [1.0, 9.0], "proportional") == pytest.approx([0.5, 0.5])


def test_few_shot_split_is_stratified_and_seeded() -> None:
    labels = np.repeat(np.arange(3), 8)
    data = ArrayDataset({"x": np.arange(24)}, labels, ["a", "b", "c"])
    train, val = stratified_split(data, seed=0)
    assert len(val) == 6 and sorted(np.bincount(val.labels).tolist()) == [2, 2, 2]  # type: ignore[arg-type]
    assert not set(train.inputs["x"]) & set(val.inputs["x"])
    assert stratified_split(data, seed=0)[1].inputs["x"].tolist() == val.inputs["x"].tolist()
