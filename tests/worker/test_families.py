"""Model families: chosen once from the task (and the input model), each with its budget, gains and headline."""

from __future__ import annotations

import pytest

from models.spec import JobSpec
from worker.core import StepFailed, WorkingModel
from worker.families import CausalLM, Classifier, Embedding, family_for


def _spec(task: str, **evaluate: float) -> JobSpec:
    return JobSpec.model_validate({"model": "m", "task": task, "evaluate": evaluate})


def _side(metric: float | None, **extra: object) -> dict[str, object]:
    return {"metric": {"name": "accuracy", "value": metric}, **extra}


def test_the_family_comes_from_the_task_or_a_causal_lm_input() -> None:
    assert type(family_for("image-classification")) is Classifier
    assert type(family_for("text-classification")) is Classifier and type(family_for("generic")) is Classifier
    assert type(family_for("feature-extraction")) is Embedding and type(family_for("text-generation")) is CausalLM
    lm = WorkingModel("torch", "hf", ["input_ids"], ["logits"], meta={"hf_task": "text-generation"})
    assert type(family_for("generic", lm)) is CausalLM  # generic on a causal LM is a causal LM
    assert type(family_for("generic", WorkingModel("onnx", "onnx", ["x"], ["y"]))) is Classifier


def test_the_classifier_budget_is_the_metric_drop() -> None:
    fam = family_for("image-classification")
    kept = fam.budget(_spec("image-classification", max_accuracy_drop=0.02), _side(0.9), _side(0.885))
    assert kept["met"] is True and kept["accuracy_drop"] == pytest.approx(0.015) and kept["metric"] == "accuracy"
    missed = fam.budget(_spec("image-classification", max_accuracy_drop=0.01), _side(0.9), _side(0.885))
    assert missed["met"] is False and "reason" not in missed
    unmeasured = fam.budget(_spec("image-classification", max_accuracy_drop=0.01), _side(None), _side(0.9))
    assert unmeasured["met"] is False and "could not be measured" in unmeasured["reason"]
    assert fam.budget(_spec("generic"), _side(0.9), _side(0.1))["met"] is True  # no bound given


def test_each_family_has_its_gains_headline_and_form_rule() -> None:
    output = {"fidelity": {"cosine": 0.99}, "agreement": {"top1": 0.98}, "perplexity": 11.0,
              "decode": {"tokens_per_s": 300.0}, "peak_memory_bytes": 100}
    baseline = {"perplexity": 10.0, "decode": {"tokens_per_s": 100.0}, "peak_memory_bytes": 400}
    assert Embedding().headline(output) == {"cosine": 0.99} and Embedding().gains(baseline, output) == {}
    lm = CausalLM()
    assert lm.headline(output) == {"top1": 0.98} and lm.reuses_input_export and "perplexity" in lm.step_eval_keys
    assert lm.gains(baseline, output) == {"decode_speedup": 3.0, "perplexity_ratio": 1.1, "memory_ratio": 4.0}
    onnx_lm = WorkingModel("onnx", "hf", ["input_ids"], ["logits"])
    with pytest.raises(StepFailed, match="cannot be made trainable again"):
        lm.check_form(onnx_lm, "torch")
    Classifier().check_form(onnx_lm, "torch")  # a classifier's ONNX form converts back (onnx2torch)
