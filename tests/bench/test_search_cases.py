"""bench.search: each case's specs are jobs the API accepts, with the data roles its assets upload."""

from __future__ import annotations

import argparse

from bench.search import CASE_SETS, CASES, GOAL_ACC_POINTS
from models.spec import JobSpec


def test_every_case_submits_specs_the_api_accepts_on_its_uploaded_roles() -> None:
    a = argparse.Namespace(seed=0, max_trials=8, latency_runs=50, latency_warmup=5)
    for name, case in CASES.items():
        data = {role: f"ds_{role}" for role in case.roles}
        for make in (case.fixed, case.search):
            if make is None:
                continue
            spec = JobSpec.model_validate(make(a, "mdl_x", data))
            assert {k for k, v in spec.data.model_dump().items() if v} == set(case.roles), name
    orientation = JobSpec.model_validate(CASES["orientation"].search(a, "mdl_x", {"train": "t", "eval": "e"}))
    assert orientation.search is not None and orientation.search.objective == "size"
    assert orientation.search.constraints.max_accuracy_drop == GOAL_ACC_POINTS / 100
    assert CASES["orientation"].fixed is None  # bench.vision_zoo runs its fixed recipe
    assert CASE_SETS["both"] == ("cnn", "encoder") and set(CASE_SETS["all"]) == set(CASES)
