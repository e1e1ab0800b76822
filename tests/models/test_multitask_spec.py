"""The multi-task parts of the job spec: tasks replace data.train, their datasets count as the job's, the step's
label names the task count, and the settings that only apply to one kind of step are refused."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from models.spec import FinetuneStep, JobSpec, step_label

TASKS: list[dict[str, Any]] = [{"name": "a", "data": {"train": "ds_a", "eval": "ds_ae"}}, {"name": "b", "data": {"train": "ds_b"}, "weight": 3}]


def test_tasks_stand_for_train_data_and_their_datasets_are_the_jobs() -> None:
    spec = JobSpec.model_validate({"model": "m", "steps": [{"type": "finetune", "tasks": TASKS}]})
    assert spec.dataset_ids() == {"ds_a", "ds_ae", "ds_b"}
    first = spec.first_task_data()
    assert first is not None and (first.train, first.eval) == ("ds_a", "ds_ae")
    assert step_label(spec.steps[0]) == "finetune (full, 2 tasks)"
    assert JobSpec.model_validate({"model": "m", "data": {"eval": "e"}}).first_task_data() is None


def test_refusals() -> None:
    with pytest.raises(ValidationError, match=r"needs data\.train"):
        JobSpec.model_validate({"model": "m", "steps": [{"type": "finetune"}]})
    with pytest.raises(ValidationError, match=r"steps.0.tasks.1.name: task 'a' is repeated"):
        JobSpec.model_validate({"model": "m", "steps": [{"type": "finetune", "tasks": [TASKS[0], TASKS[0]]}]})
    with pytest.raises(ValidationError, match="until does not apply with tasks"):
        FinetuneStep.model_validate({"type": "finetune", "tasks": TASKS, "until": {"max_accuracy_drop": 0.01}})
    with pytest.raises(ValidationError, match="greater than 0"):
        FinetuneStep.model_validate({"type": "finetune", "tasks": [{**TASKS[0], "weight": 0}]})
    with pytest.raises(ValidationError, match="sampling and temperature apply with tasks only"):
        FinetuneStep.model_validate({"type": "finetune", "temperature": 3.0})


def test_a_stored_spec_without_tasks_validates_again() -> None:
    """The stored spec (and POST /v1/jobs's split) carries every default: a finetune without tasks must pass again."""
    spec = JobSpec.model_validate({"model": "m", "data": {"train": "t"}, "steps": [{"type": "finetune"}]})
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec
