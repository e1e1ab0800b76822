"""The job spec validates what can be checked without running anything."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from models.spec import (
    ACCURACY_TASKS,
    CLASSIFICATION_TASKS,
    STEP_FORMS,
    STEP_KINDS,
    JobSpec,
    carve_refusal,
    carve_sizes,
    step_label,
    step_types,
)


def test_defaults_and_round_trip() -> None:
    spec = JobSpec.model_validate({"model": "mdl_1", "steps": [{"type": "quantize"}]})
    assert spec.steps[0].type == "quantize" and spec.steps[0].mode == "dynamic"
    assert spec.export.opset == 17 and spec.seed == 0
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"steps": [{"type": "prune", "ratio": 1.5}]}, ("steps", 0, "prune", "ratio")),
        ({"steps": [{"type": "bogus"}]}, ("steps", 0)),
        ({"steps": [{"type": "quantize", "mode": "int2"}]}, ("steps", 0, "quantize", "mode")),
        ({"steps": [{"type": "quantize", "mode": "int4", "block_size": 512}]}, ("steps", 0, "quantize", "block_size")),
        ({"steps": [{"type": "quantize", "colour": "red"}]}, ("steps", 0, "quantize", "colour")),
    ],
)
def test_field_errors_name_the_field(body: dict, where: tuple) -> None:
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({"model": "mdl_1", **body})
    assert e.value.errors()[0]["loc"] == where


def test_training_step_needs_train_data_and_cannot_follow_quantize() -> None:
    with pytest.raises(ValidationError, match=r"steps\.0: a 'finetune' step needs data.train"):
        JobSpec.model_validate({"model": "m", "steps": [{"type": "finetune"}]})
    with pytest.raises(ValidationError, match=r"steps\.1: a 'distill' step cannot follow 'quantize'"):
        JobSpec.model_validate({"model": "m", "data": {"train": "ds"},
                                "steps": [{"type": "quantize"}, {"type": "distill"}]})


def test_step_forms_cover_every_step_type() -> None:
    assert sorted(STEP_FORMS) == step_types() == ["distill", "export", "finetune", "prune", "quantize"]
    assert list(STEP_KINDS) == ["quantize", "prune", "finetune", "distill", "export"]  # GET /v1/passes order
    assert all(STEP_FORMS[name] == kind.takes for name, kind in STEP_KINDS.items())


def test_the_step_union_is_built_from_the_table() -> None:
    steps = [{"type": name} for name in STEP_KINDS if name != "quantize"] + [{"type": "quantize"}]
    spec = JobSpec.model_validate({"model": "m", "data": {"train": "d"}, "steps": steps})
    assert {type(s) for s in spec.steps} == {k.params for k in STEP_KINDS.values()}


def test_training_jobs_ask_for_the_gpu_queue() -> None:
    assert JobSpec.model_validate({"model": "m", "data": {"train": "d"},
                                   "steps": [{"type": "finetune"}]}).needs_training()
    assert not JobSpec.model_validate({"model": "m", "steps": [{"type": "quantize"}]}).needs_training()
    assert JobSpec.model_validate({"model": "m", "steps": [{"type": "prune"}]}).needs_training()  # prune: gpu


@pytest.mark.parametrize(
    ("step", "label"),
    [
        ({"type": "quantize", "mode": "static"}, "quantize (static)"),
        ({"type": "quantize"}, "quantize (dynamic)"),
        ({"type": "prune", "method": "unstructured", "ratio": 0.25}, "prune (unstructured 0.25)"),
        ({"type": "finetune", "mode": "lora"}, "finetune (lora)"),
        ({"type": "distill", "epochs": 2}, "distill"),
        ({"type": "distill", "student": {"layers": 2}}, "distill (to 2 layers)"),
        ({"type": "quantize", "mode": "int4", "algorithm": "gptq", "block_size": 64}, "quantize (int4 gptq b64)"),
        ({"type": "export", "opset": 18}, "export (opset 18)"),
    ],
)
def test_step_label_is_the_same_for_a_model_and_a_stored_dict(step: dict, label: str) -> None:
    model = JobSpec.model_validate({"model": "m", "data": {"train": "d"}, "steps": [step]}).steps[0]
    assert step_label(model) == step_label(step) == label


def test_step_label_of_an_invalid_dict_is_its_type() -> None:
    assert step_label({"type": "prune", "ratio": 7}) == "prune"
    assert step_label({"type": "bogus"}) == "bogus"
    assert step_label({}) == "?"


def test_task_sets() -> None:
    assert {"image-classification", "text-classification"} == CLASSIFICATION_TASKS
    assert CLASSIFICATION_TASKS | {"generic"} == ACCURACY_TASKS and "feature-extraction" not in ACCURACY_TASKS


def test_weight_only_parameters_belong_to_the_weight_only_modes() -> None:
    spec = JobSpec.model_validate({"model": "m", "steps": [{"type": "quantize", "mode": "int4", "block_size": 32,
                                                            "bits": {"lm_head*": 8}}]})
    assert spec.steps[0].block_size == 32 and spec.steps[0].bits == {"lm_head*": 8}
    with pytest.raises(ValidationError, match="apply to modes int4 and int8_weight only"):
        JobSpec.model_validate({"model": "m", "steps": [{"type": "quantize", "mode": "dynamic", "block_size": 32}]})
    with pytest.raises(ValidationError, match="power of two"):
        JobSpec.model_validate({"model": "m", "steps": [{"type": "quantize", "mode": "int4", "block_size": 48}]})
    with pytest.raises(ValidationError, match="gptq' needs calibration text"):
        JobSpec.model_validate({"model": "m", "steps": [{"type": "quantize", "mode": "int4", "algorithm": "gptq"}]})


def test_few_shot_needs_choices_and_train_data() -> None:
    with pytest.raises(ValidationError, match=r"few_shot needs evaluate\.choices"):
        JobSpec.model_validate({"model": "m", "evaluate": {"few_shot": 2}})
    with pytest.raises(ValidationError, match=r"draws its examples from data\.train"):
        JobSpec.model_validate({"model": "m", "evaluate": {"few_shot": 2, "choices": ["a", "b"]}})


def test_auto_exclude_and_until_are_validated_in_a_job_spec() -> None:
    step = {"type": "quantize", "auto_exclude": {"min_fidelity": 0.99}}
    with pytest.raises(ValidationError, match=r"steps\.0: auto_exclude measures sensitivity on data.calibration"):
        JobSpec.model_validate({"model": "m", "steps": [step]})
    spec = JobSpec.model_validate({"model": "m", "data": {"calibration": "ds"}, "steps": [step]})
    assert spec.steps[0].auto_exclude.max_nodes == 8  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match="exactly one of min_fidelity and max_accuracy_drop"):
        JobSpec.model_validate({"model": "m", "data": {"calibration": "ds"},
                                "steps": [{"type": "quantize", "auto_exclude": {}}]})
    ft = {"type": "finetune", "until": {"max_accuracy_drop": 0.01}, "max_epochs": 20}
    spec = JobSpec.model_validate({"model": "m", "data": {"train": "ds"}, "steps": [ft]})
    assert spec.steps[0].planned_epochs() == 20  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match="max_epochs applies with until only"):
        JobSpec.model_validate({"model": "m", "data": {"train": "ds"},
                                "steps": [{"type": "distill", "max_epochs": 5}]})


def test_a_trial_spec_is_the_search_spec_with_its_steps_and_the_search_budgets() -> None:
    from models.spec import trial_spec

    spec = JobSpec.model_validate({
        "model": "m", "task": "image-classification", "data": {"eval": "e"},
        "evaluate": {"latency": {"runs": 7}},
        "search": {"constraints": {"max_accuracy_drop": 0.01}, "space": [[{"type": "quantize", "mode": "fp16"}]]},
    })
    trial = trial_spec(spec, [{"type": "quantize", "mode": "fp16"}])
    assert trial.search is None and [s.type for s in trial.steps] == ["quantize"]
    assert trial.evaluate.max_accuracy_drop == 0.01 and trial.evaluate.latency.runs == 7
    assert trial.data == spec.data and trial.task == spec.task


def test_a_search_space_entry_is_validated_like_steps() -> None:
    with pytest.raises(ValidationError, match=r"search.space.1: steps.1: a 'prune' step cannot follow 'quantize'"):
        JobSpec.model_validate({"model": "m", "search": {"space": [
            [{"type": "quantize"}], [{"type": "quantize"}, {"type": "prune"}]]}})
    with pytest.raises(ValidationError, match="a trial needs at least one step"):
        JobSpec.model_validate({"model": "m", "search": {"space": [[]]}})


def test_steps_declare_the_models_they_refer_to() -> None:
    spec = JobSpec.model_validate({"model": "m", "data": {"train": "d"}, "steps": [
        {"type": "distill", "teacher": "mdl_t", "student": {"model": "mdl_s"}},
        {"type": "distill", "teacher": "current", "student": {"layers": 2}}, {"type": "quantize"}]})
    first, second, third = (s.model_refs() for s in spec.steps)
    assert [(r.field, r.model_id, r.use) for r in first] == [
        ("teacher", "mdl_t", "distillation (as the teacher)"), ("student.model", "mdl_s", "distillation (as the student)")]
    assert second == third == []
    assert spec.model_ids() == {"m", "mdl_t", "mdl_s"}


def test_calibrating_steps_carve_from_eval_only_when_nothing_else_calibrates() -> None:
    steps = [{"type": "prune", "importance": "taylor", "ratio": 0.3},
             {"type": "quantize", "mode": "static", "calibration": {"samples": 64},
              "auto_exclude": {"min_fidelity": 0.9, "samples": 16}}]
    spec = JobSpec.model_validate({"model": "m", "data": {"eval": "e"}, "steps": steps})
    assert spec.calibration_readers() == [("steps.0.importance", 256), ("steps.1.mode", 64),
                                          ("steps.1.auto_exclude", 16)]
    assert spec.carves_calibration()
    assert carve_sizes(spec, 4000) == (256, 3744) and carve_sizes(spec, 100) == (25, 75)
    assert carve_sizes(spec, 31) is None and "data.eval has 31 rows" in carve_refusal(spec, 31)
    for data in ({"eval": "e", "train": "t"}, {"eval": "e", "calibration": "c"}):
        assert not JobSpec.model_validate({"model": "m", "data": data, "steps": steps[1:]}).carves_calibration()
    dynamic = JobSpec.model_validate({"model": "m", "data": {"eval": "e"}, "steps": [{"type": "quantize"}]})
    assert dynamic.calibration_readers() == [] and not dynamic.carves_calibration()
