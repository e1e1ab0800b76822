"""The multi-task parts of the job spec: tasks replace data.train, their datasets count as the job's, the step's
label names the task count, and the settings that only apply to one kind of step are refused."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from models.spec import FinetuneStep, JobSpec, step_label, trial_spec

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


def test_a_search_may_take_multi_task_trials_or_a_multi_task_prefix() -> None:
    """Every task names eval rows: no data.eval is needed for max_accuracy_drop (each task is measured on its own);
    the prefix runs first in every trial; static INT8 after tasks calibrates on their train rows."""
    evaluated = [{"name": "a", "data": {"train": "ds_a", "eval": "ds_ae"}}, {"name": "b", "data": {"train": "ds_b",
                                                                                                    "eval": "ds_be"}}]
    ft = {"type": "finetune", "tasks": evaluated}
    search = {"objective": "size", "constraints": {"max_accuracy_drop": 0.01}}
    explicit = JobSpec.model_validate({"model": "m", "search": {
        **search, "space": [[ft, {"type": "quantize", "mode": "static"}], [ft, {"type": "quantize", "mode": "fp16"}]]}})
    assert explicit.dataset_ids() == {"ds_a", "ds_ae", "ds_b", "ds_be"}
    assert [p for p, _ in explicit.step_paths()] == ["search.space.0.0", "search.space.0.1", "search.space.1.0",
                                                     "search.space.1.1"]
    prefixed = JobSpec.model_validate({"model": "m", "search": {**search, "prefix": [ft], "space": "auto"}})
    trial = trial_spec(prefixed, [{"type": "quantize", "mode": "static"}])
    assert [s.type for s in trial.steps] == ["finetune", "quantize"] and trial.evaluate.max_accuracy_drop == 0.01
    assert [t.name for t in trial.output_tasks() or []] == ["a", "b"]
    assert trial_spec(prefixed, [], prefix=False).steps == []  # the input's own baseline row runs no prefix
    with pytest.raises(ValidationError, match=r"max_accuracy_drop: measured on eval data"):
        JobSpec.model_validate({"model": "m", "search": {**search, "space": [[{**ft, "tasks": TASKS}]]}})
    with pytest.raises(ValidationError, match=r"search.space.1: steps.1: a 'finetune' step cannot follow 'quantize'"):
        JobSpec.model_validate({"model": "m", "search": {"prefix": [{"type": "quantize", "mode": "fp16"}],
                                                         "space": [[{"type": "quantize"}], [ft]]}})
