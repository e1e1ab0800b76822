"""The typed report reads what build_report wrote before it existed, and writes nothing of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.report import Evaluation, LatencyStats, Report, Trial
from tests.api.report_samples import search_report

# Written by worker.pipeline.build_report at f21d846 (before models.report): a dynamic-INT8 MLP on the digits
# set, and a tiny Llama exported with its KV cache (tests/worker/conftest.py and tests/worker/lm/conftest.py).
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["report_classifier.json", "report_lm.json"])
def test_a_stored_report_reads_back_unchanged(name: str) -> None:
    stored = json.loads((FIXTURES / name).read_text())
    report = Report.read(stored)
    assert report.dump() == stored
    assert isinstance(report.input, Evaluation) and isinstance(report.output, Evaluation)
    assert isinstance(report.input.latency_ms, LatencyStats) and report.input.latency_median == pytest.approx(
        stored["input"]["latency_ms"]["median"])
    assert report.gains is not None and report.gains.size_ratio == stored["gains"]["size_ratio"]
    assert report.budget is not None and report.budget.met is True
    assert [s.label for s in report.steps] == stored["pipeline"]


def test_the_classifier_report_is_typed() -> None:
    report = Report.read(json.loads((FIXTURES / "report_classifier.json").read_text()))
    assert not report.is_lm and report.budget is not None and not report.budget.is_lm
    assert report.output is not None and report.output.metric is not None
    assert report.output.metric.name == "accuracy" and report.output.metric_value == report.output.accuracy
    assert report.output.num_samples == 540 and report.budget.max_accuracy_drop == 0.02
    assert report.warnings[0]["code"] == "slower_than_input"


def test_the_lm_report_is_typed() -> None:
    report = Report.read(json.loads((FIXTURES / "report_lm.json").read_text()))
    assert report.is_lm and report.budget is not None and report.budget.is_lm
    assert report.budget.max_perplexity_increase == 0.01 and report.budget.perplexity_increase == 0.0
    assert report.output is not None and report.output.decode is not None and report.output.decode.tokens_per_s > 0
    assert report.output.metric is not None and report.output.metric.higher_is_better is False
    assert report.gains is not None and report.gains.perplexity_ratio == 1.0


def test_a_search_section_reads_as_trials() -> None:
    stored = search_report()
    report = Report.read(stored)
    assert report.dump() == json.loads(json.dumps(stored))
    assert report.search is not None and report.search.objective == "latency"
    trials = report.search.trials
    assert [t.index for t in trials] == [0, 1, 2, 3] and all(isinstance(t, Trial) for t in trials)
    assert trials[0].latency == 0.1 and trials[3].latency == 0.05  # re-measured when it was a finalist
    assert trials[2].job_id is None and trials[2].reason and trials[3].misses == ["quality: accuracy drop 0.76 > 0.02"]


def test_older_shapes_and_junk_still_read() -> None:
    old = Report.read({"task": "generic", "input": {"latency_ms": 2.5}, "output": "junk", "budget": {"met": False}})
    assert old.input is not None and old.input.latency_median == 2.5
    assert old.output is None and old.budget is not None and old.budget.met is False  # the junk key is left out
    assert Report.read(None).dump() == {} and Report.read([1, 2]).input is None
