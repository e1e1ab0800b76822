"""The search space and its decisions: auto candidates, ordering, skips, constraints, the Pareto front."""

from __future__ import annotations

import pytest

from models.search_space import (
    MIN_GAIN,
    Outcome,
    auto_space,
    candidates,
    estimate,
    meets,
    pareto,
    skip_reason,
    worst_fidelity,
)
from models.spec import JobSpec


def _valid(space: list[list[dict]], **data: str) -> None:
    """Every candidate is a steps list a job accepts with the given data."""
    for steps in space:
        JobSpec.model_validate({"model": "m", "data": data, "steps": steps})


def test_auto_without_train_data_is_post_training_only() -> None:
    space = auto_space("image-classification", "onnx", {"op_types": {"MatMul": 2}}, train=False, calibration=False)
    assert 2 <= len(space) <= 8
    assert all(s["type"] == "quantize" for steps in space for s in steps)
    assert {s[0]["mode"] for s in space} == {"fp16", "dynamic"}  # static needs calibration data
    _valid(space)
    with_eval = auto_space("image-classification", "onnx", {}, train=False, calibration=True)
    assert {s[0]["mode"] for s in with_eval} == {"fp16", "dynamic", "static"}
    _valid(with_eval, eval="d")


def test_auto_with_train_data_adds_pruning_with_recovery_and_a_layer_dropped_student() -> None:
    space = auto_space("text-classification", "hf", {"layers": 4}, train=True, calibration=True)
    assert 3 <= len(space) <= 8
    pruned = [steps for steps in space if steps[0]["type"] == "prune"]
    assert {p[0]["ratio"] for p in pruned} == {0.25, 0.5} and all(p[1]["type"] == "distill" for p in pruned)
    students = [steps for steps in space if steps[0]["type"] == "distill"]
    assert students and students[0][0]["student"] == {"layers": 2}
    _valid(space, train="t", eval="e")
    onnx_space = auto_space("image-classification", "onnx", {}, train=True, calibration=True)
    assert not [s for s in onnx_space if s[0]["type"] == "distill"]  # layer dropping is for transformers


def test_auto_for_causal_lms_tries_int4_algorithms_and_block_sizes() -> None:
    space = auto_space("text-generation", "hf", {"layers": 2}, train=False, calibration=True)
    int4 = [s[0] for s in space if s[0]["mode"] == "int4"]
    assert {q["algorithm"] for q in int4} == {"rtn", "hqq", "gptq"}
    assert len({q["block_size"] for q in int4}) >= 2
    _valid(space, calibration="c")
    assert "gptq" not in {s[0].get("algorithm") for s in auto_space("text-generation", "hf", {}, train=False,
                                                                      calibration=False)}


def test_candidates_are_cheapest_first_and_deduplicated() -> None:
    space = [[{"type": "prune", "ratio": 0.5}, {"type": "distill"}], [{"type": "quantize", "mode": "static"}],
             [{"type": "quantize", "mode": "fp16"}], [{"type": "quantize", "mode": "fp16"}]]
    got = candidates(space)
    assert [c.label for c in got] == ["quantize (fp16)", "quantize (static)", "prune (structured 0.5) + distill"]
    assert [c.cost for c in got] == sorted(c.cost for c in got)


def test_estimates_multiply_ratios_and_training_lowers_the_risk() -> None:
    pq = estimate([{"type": "prune", "ratio": 0.5}, {"type": "quantize", "mode": "dynamic"}])
    assert pq.size_ratio == pytest.approx(0.5 * 0.27)
    recovered = estimate([{"type": "prune", "ratio": 0.5}, {"type": "distill"}, {"type": "quantize"}])
    assert recovered.risk < pq.risk


def test_a_trial_that_cannot_beat_the_best_is_skipped() -> None:
    fp16 = estimate([{"type": "quantize", "mode": "fp16"}])
    best = Outcome(met=True, objective_ratio=0.27, risk=0.2)
    reason = skip_reason(fp16, "size", [best])
    assert reason is not None and reason.startswith("cannot beat the best")
    # Expected clearly better than the best: started.
    assert skip_reason(estimate([{"type": "quantize", "mode": "int4"}]), "size", [best]) is None
    # A best that missed the constraints does not count.
    assert skip_reason(fp16, "size", [Outcome(met=False, objective_ratio=0.1, risk=0.2, reasons=["size: x"])]) is None
    # Within MIN_GAIN of the best is not worth a trial.
    near = Outcome(met=True, objective_ratio=fp16.size_ratio / (1 - MIN_GAIN / 2), risk=0.0)
    assert skip_reason(fp16, "size", [near]) is not None


def test_a_trial_riskier_than_one_that_missed_the_quality_constraints_is_dominated() -> None:
    mild = Outcome(met=False, objective_ratio=0.3, risk=0.2, reasons=["quality: accuracy drop 0.05 > 0.01"])
    riskier = estimate([{"type": "quantize", "mode": "static"}])
    reason = skip_reason(riskier, "latency", [mild])
    assert reason is not None and reason.startswith("dominated")
    safer = estimate([{"type": "quantize", "mode": "fp16"}])
    assert skip_reason(safer, "latency", [mild]) is None
    # A trial that crashed says nothing about how risky recipes fare.
    crashed = Outcome(met=False, objective_ratio=None, risk=0.0, reasons=["failed: step_failed"])
    assert skip_reason(riskier, "latency", [crashed]) is None


def _report(drop: float, size: int = 1_000_000, latency: float = 2.0, **fid: float) -> dict:
    return {"budget": {"accuracy_drop": drop}, "fidelity": fid,
            "output": {"size_bytes": size, "latency_ms": {"median": latency}}}


def test_meets_names_every_missed_constraint() -> None:
    c = {"max_accuracy_drop": 0.01, "max_size_mb": 0.5, "max_latency_ms": 1.0}
    misses = meets(c, _report(0.02), "image-classification")
    assert [m.split(":")[0] for m in misses] == ["quality", "size", "latency"]
    assert meets(c, _report(0.005, size=400_000), "image-classification", latency_ms=0.9) == []
    assert meets({"max_accuracy_drop": 0.01}, {"budget": {}}, "generic")  # not measured: not met
    # read by people in the search table: no raw floats like 0.05037783375314864
    raw = meets(c, _report(0.05037783375314864, size=1_234_567, latency=1.2345678901), "image-classification")
    assert raw == ["quality: accuracy drop 5.04 points > 1.00 points", "size: 1.235 MB > 0.5 MB",
                   "latency: 1.235 ms > 1 ms"]
    assert meets({"max_perplexity_increase": 0.05}, {"budget": {"perplexity_increase": 0.0712345}}, "text-generation") \
        == ["quality: perplexity increase +7.12 % > +5.00 %"]


def test_min_fidelity_is_the_worst_sample_for_embeddings_and_top1_agreement_for_classifiers() -> None:
    emb = _report(0.0, cosine=0.999, min_cosine=0.91)
    assert worst_fidelity(emb, "feature-extraction") == pytest.approx(0.91)
    assert meets({"min_fidelity": 0.95}, emb, "feature-extraction")  # the mean would pass, the worst does not
    assert meets({"min_fidelity": 0.9}, emb, "feature-extraction") == []
    cls = _report(0.0, cosine=0.99, min_cosine=0.5, top1_agreement=0.98)
    assert worst_fidelity(cls, "image-classification") == pytest.approx(0.98)
    assert meets({"min_fidelity": 0.97}, cls, "image-classification") == []


def test_pareto_keeps_the_non_dominated_points() -> None:
    points = [("a", 1.0, 0.90), ("b", 2.0, 0.95), ("c", 2.0, 0.90), ("d", 0.5, 0.80), ("e", 3.0, 0.95)]
    assert pareto(points) == ["a", "b", "d"]
