"""The job spec validates what can be checked without running anything."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from models.spec import STEP_FORMS, JobSpec, step_types


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
        ({"steps": [{"type": "quantize", "mode": "int4"}]}, ("steps", 0, "quantize", "mode")),
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


def test_training_jobs_ask_for_the_gpu_queue() -> None:
    assert JobSpec.model_validate({"model": "m", "data": {"train": "d"},
                                   "steps": [{"type": "finetune"}]}).needs_training()
    assert not JobSpec.model_validate({"model": "m", "steps": [{"type": "quantize"}]}).needs_training()
