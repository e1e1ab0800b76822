"""The search space and its decisions: auto candidates, ordering, skips, constraints, the Pareto front."""

from __future__ import annotations

import pytest

from models.objectives import MIN_NOISE, paired_ratio
from models.search_space import (
    MAX_RECOVERY_EPOCHS,
    MIN_GAIN,
    SMOOTH_ALPHA,
    Outcome,
    auto_space,
    barred_winner,
    beats_input,
    candidates,
    escalations,
    estimate,
    fp16_dropped,
    meets,
    noise_margin,
    pareto,
    prefix_shortfall,
    shortfall,
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
    # static needs calibration data; fp16 is slower than float32 on the CPU provider, so it is left out there
    assert [s[0]["mode"] for s in space] == ["dynamic", "int8_weight"]
    _valid(space)
    with_eval = auto_space("image-classification", "onnx", {}, train=False, calibration=True)
    assert {s[0]["mode"] for s in with_eval} == {"dynamic", "static", "int8_weight"}
    _valid(with_eval, eval="d")
    on_gpu = auto_space("image-classification", "onnx", {}, train=False, calibration=True,
                        provider="CUDAExecutionProvider")
    assert "fp16" in {s[0]["mode"] for s in on_gpu}


def test_a_conv_heavy_graph_gets_static_qdq_and_never_dynamic_int8_when_data_allows_static() -> None:
    conv = {"op_types": {"Conv": 20, "Gemm": 1, "Relu": 19, "Add": 8}}
    space = auto_space("image-classification", "onnx", conv, train=True, calibration=True)
    modes = [s["mode"] for steps in space for s in steps if s["type"] == "quantize"]
    assert modes and set(modes) == {"static", "int8_folded"}, space
    _valid(space, train="t", eval="e")
    # without any data static is impossible: dynamic and the folded int8 weights (which need none)
    bare = auto_space("image-classification", "onnx", conv, train=False, calibration=False)
    assert [s[0]["mode"] for s in bare] == ["dynamic", "int8_folded"]
    hf_resnet = auto_space("image-classification", "hf", {"config": {"model_type": "resnet"}}, train=False,
                           calibration=True)
    assert [s[0]["mode"] for s in hf_resnet] == ["static", "int8_folded"]


def test_a_conv_graph_gets_folded_int8_weights_alone_and_after_each_pruning_beside_static() -> None:
    conv = {"op_types": {"Conv": 32, "MatMul": 1, "HardSigmoid": 6, "Mul": 6}}  # a PP-LCNet's counts
    space = auto_space("image-classification", "onnx", conv, train=True, calibration=True)
    lasts = {(steps[0].get("ratio"), steps[-1]["mode"]) for steps in space}
    assert lasts == {(None, "static"), (None, "int8_folded"), (0.25, "static"), (0.25, "int8_folded"),
                     (0.5, "static"), (0.5, "int8_folded")}
    pruned = [steps for steps in space if steps[0]["type"] == "prune"]
    assert all(steps[1]["type"] == "distill" for steps in pruned)  # the same recovery before either quantizer
    _valid(space, train="t", eval="e")
    # ordered first (no calibration, float speed): and a pruned trial's floor stays below a static one's measure
    cands = candidates(space)
    assert cands[0].steps == [{"type": "quantize", "mode": "int8_folded"}]
    folded = next(c for c in cands if c.steps[0].get("ratio") == 0.5 and c.steps[-1]["mode"] == "int8_folded")
    assert folded.floor("size") < 0.089 * (1 - 0.02)  # prune 0.5 -> static measured 11.27x on the PP-LCNet
    assert folded.latency_ratio <= 0.5  # the pruned float graph's kernels
    # for size, only the folded form follows a pruning: smaller than static on the same prefix, one ladder per ratio
    by_size = auto_space("image-classification", "onnx", conv, train=True, calibration=True, objective="size")
    assert {(steps[0].get("ratio"), steps[-1]["mode"]) for steps in by_size} == {
        (None, "static"), (None, "int8_folded"), (0.25, "int8_folded"), (0.5, "int8_folded")}
    # a graph of MatMuls keeps its int8_weight (MatMulNBits) and gets no folded trial
    mlp = auto_space("text-classification", "onnx", {"op_types": {"MatMul": 12}}, train=False, calibration=True)
    assert "int8_folded" not in {s[-1]["mode"] for s in mlp}


def test_auto_with_train_data_adds_pruning_with_recovery_and_a_layer_dropped_student() -> None:
    space = auto_space("text-classification", "hf", {"layers": 4}, train=True, calibration=True)
    assert 3 <= len(space) <= 8
    pruned = [steps for steps in space if steps[0]["type"] == "prune"]
    assert {p[0]["ratio"] for p in pruned} == {0.25, 0.5} and all(p[1]["type"] == "distill" for p in pruned)
    # more of the network cut, more recovery epochs
    epochs = {p[0]["ratio"]: p[1]["epochs"] for p in pruned}
    assert epochs[0.5] > epochs[0.25] >= 2
    students = [steps for steps in space if steps[0]["type"] == "distill"]
    assert students and students[0][0]["student"] == {"layers": 2}
    _valid(space, train="t", eval="e")
    onnx_space = auto_space("image-classification", "onnx", {}, train=True, calibration=True)
    assert not [s for s in onnx_space if s[0]["type"] == "distill"]  # layer dropping is for transformers


def test_auto_for_causal_lms_tries_int4_algorithms_and_block_sizes() -> None:
    """With calibration text: GPTQ first (4-bit embeddings, then 8-bit, then block 32), int8_weight last; without
    it, data-free RTN and HQQ at several block sizes."""
    space = auto_space("text-generation", "hf", {"layers": 2}, train=False, calibration=True)
    int4 = [s[0] for s in space if s[0]["mode"] == "int4"]
    assert {q["algorithm"] for q in int4} == {"gptq"} and space[0][0]["quantize_embeddings"] is True
    assert {q.get("block_size") for q in int4} == {None, 32} and space[-1][0]["mode"] == "int8_weight"
    _valid(space, calibration="c")
    free = auto_space("text-generation", "hf", {}, train=False, calibration=False)
    assert {s[0].get("algorithm") for s in free} == {None, "rtn", "hqq"}
    assert len({s[0].get("block_size") for s in free if s[0]["mode"] == "int4"}) >= 2


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


def test_a_trial_whose_optimistic_floor_cannot_beat_the_best_is_skipped() -> None:
    fp16 = estimate([{"type": "quantize", "mode": "fp16"}])
    assert fp16.floor("size") == 0.5  # 16 of 32 bits a weight: no fp16 file is smaller than half
    best = Outcome(met=True, objective_ratio=0.27, risk=0.2)
    reason = skip_reason(fp16, "size", [best])
    assert reason is not None and reason.startswith("cannot beat the best")
    assert skip_reason(estimate([{"type": "quantize", "mode": "int4"}]), "size", [best]) is None
    # The estimate alone would skip static (0.27 estimated vs 0.27 measured); its floor (0.25 size,
    # 0.2 latency) says it still can win on latency, so the budget is spent on it.
    static = estimate([{"type": "quantize", "mode": "static"}])
    assert static.ratio("size") >= 0.27 * (1 - MIN_GAIN)
    assert skip_reason(static, "latency", [Outcome(met=True, objective_ratio=0.27, risk=0.2)]) is None
    # A best that missed the constraints does not count.
    assert skip_reason(fp16, "size", [Outcome(met=False, objective_ratio=0.1, risk=0.2, reasons=["size: x"])]) is None
    # Within MIN_GAIN of the best is not worth a trial.
    near = Outcome(met=True, objective_ratio=fp16.floor("size") / (1 - MIN_GAIN / 2), risk=0.0)
    assert skip_reason(fp16, "size", [near]) is not None
    # Pruning shrinks a layer's weights on both sides: prune 0.5 + int8 can reach 1/16 of the input.
    pruned = estimate([{"type": "prune", "ratio": 0.5}, {"type": "distill"}, {"type": "quantize", "mode": "static"}])
    assert pruned.floor("size") == pytest.approx(0.25 * 0.25)


def test_only_the_same_recipe_at_least_as_aggressive_is_dominated_by_a_quality_miss() -> None:
    quality = ["quality: accuracy drop 0.05 > 0.01"]
    p25 = [{"type": "prune", "ratio": 0.25}, {"type": "distill", "epochs": 2}, {"type": "quantize", "mode": "static"}]
    p50 = [{**p25[0], "ratio": 0.5}, *p25[1:]]
    mild = Outcome(met=False, objective_ratio=0.3, risk=0.6, reasons=quality, steps=p25)
    reason = skip_reason(estimate(p50), "size", [mild])
    assert reason is not None and reason.startswith("dominated")
    # more recovery epochs is another recipe: it may hold the budget where 2 epochs did not
    longer = [p50[0], {"type": "distill", "epochs": 8}, p50[2]]
    assert skip_reason(estimate(longer), "size", [mild]) is None
    # static INT8 is not judged by dynamic INT8's miss (another recipe, often the better one on Conv)
    dyn = Outcome(met=False, objective_ratio=0.3, risk=0.2, reasons=quality, steps=[{"type": "quantize"}])
    assert skip_reason(estimate([{"type": "quantize", "mode": "static"}]), "latency", [dyn]) is None
    # A trial that crashed says nothing about how its recipe fares.
    crashed = Outcome(met=False, objective_ratio=None, risk=0.0, reasons=["failed: step_failed"], steps=p25)
    assert skip_reason(estimate(p50), "latency", [crashed]) is None


def test_a_quality_miss_escalates_to_the_recipes_that_fix_it() -> None:
    static = [{"type": "quantize", "mode": "static", "per_channel": False}]
    fixes = escalations(static, {"min_fidelity": 0.99}, calibration=True)
    labels = [estimate(f).label for f in fixes]
    assert labels == ["quantize (static)", "quantize (static percentile 99.99 per-tensor)",
                      "quantize (static entropy per-tensor)", "quantize (static per-tensor auto_exclude)"]
    assert fixes[-1][0]["auto_exclude"] == {"min_fidelity": 0.99}
    dyn = escalations([{"type": "quantize", "mode": "dynamic"}], {"max_accuracy_drop": 0.01}, calibration=True)
    # dynamic: SmoothQuant scales first (no run-time cost), then nodes kept in float
    assert dyn == [[{"type": "quantize", "mode": "dynamic", "smooth": SMOOTH_ALPHA}],
                   [{"type": "quantize", "mode": "dynamic", "auto_exclude": {"max_accuracy_drop": 0.01}}]]
    assert [estimate(f).label for f in dyn] == ["quantize (dynamic smooth 0.75)", "quantize (dynamic auto_exclude)"]
    # a smoothed trial that missed keeps nodes of the smoothed graph in float
    assert escalations(dyn[0], {"max_accuracy_drop": 0.01}, calibration=True) == [
        [{"type": "quantize", "mode": "dynamic", "smooth": SMOOTH_ALPHA, "auto_exclude": {"max_accuracy_drop": 0.01}}]]
    assert escalations([{"type": "quantize", "mode": "dynamic"}], {"max_accuracy_drop": 0.01}, calibration=False) == []
    # auto_exclude that met its target on a few calibration samples but missed on the eval set: more of both,
    # aiming at half the loss allowed
    wider = escalations(dyn[1], {"max_accuracy_drop": 0.01}, calibration=True)
    assert wider[0][0]["auto_exclude"] == {"max_accuracy_drop": 0.005, "samples": 128, "max_nodes": 16}
    fid = escalations([{"type": "quantize", "mode": "dynamic", "auto_exclude": {"min_fidelity": 0.99}}],
                      {"min_fidelity": 0.99}, calibration=True)
    assert fid[0][0]["auto_exclude"]["min_fidelity"] == pytest.approx(0.995)
    assert escalations(wider[0], {"max_accuracy_drop": 0.01}, calibration=True) == []
    int4 = escalations([{"type": "quantize", "mode": "int4", "algorithm": "rtn", "block_size": 128}],
                       {"max_perplexity_increase": 0.05}, calibration=True)
    assert [f[0].get("block_size") for f in int4][:1] == [64]
    assert {f[0].get("algorithm") for f in int4} >= {"gptq"} and int4[-1][0]["mode"] == "int8_weight"
    # a pruned trial that missed gets twice the recovery, up to MAX_RECOVERY_EPOCHS
    pruned = [{"type": "prune", "ratio": 0.5}, {"type": "distill", "epochs": 4}, {"type": "quantize", "mode": "static"}]
    more = escalations(pruned, {"max_accuracy_drop": 0.01}, calibration=True)
    assert len(more) == 1 and more[0][1]["epochs"] == 8 and more[0][0] == pruned[0]
    capped = [pruned[0], {"type": "distill", "epochs": MAX_RECOVERY_EPOCHS}, pruned[2]]
    assert escalations(capped, {"max_accuracy_drop": 0.01}, calibration=True) == []
    _valid(fixes + dyn + wider + int4 + more, train="t", eval="e")
    # a hopeless miss (static INT8 at cosine 0.19 against 0.99: 81x the loss allowed) tries no quantize fix
    far = shortfall({"min_fidelity": 0.99}, {"fidelity": {"min_cosine": 0.19}}, "feature-extraction")
    assert far == pytest.approx(81.0)
    assert escalations(static, {"min_fidelity": 0.99}, calibration=True, miss=far) == []
    near = shortfall({"min_fidelity": 0.99}, {"fidelity": {"min_cosine": 0.9856}}, "feature-extraction")
    assert near == pytest.approx(1.44) and escalations(static, {"min_fidelity": 0.99}, calibration=True, miss=near)
    # a pruned trial trains on whatever the miss: its loss is the pruning's; far past the budget, 4x the epochs
    four = [[pruned[0], {**pruned[1], "epochs": 16}, pruned[2]]]
    assert escalations(pruned, {"max_accuracy_drop": 0.01}, calibration=True, miss=50.0) == four
    assert escalations(pruned, {"max_accuracy_drop": 0.01}, calibration=True, miss=5.0) == more
    assert escalations(pruned, {"max_accuracy_drop": 0.01}, calibration=True, miss=50.0, prefix_miss=3.0) == more
    assert escalations(pruned, {"max_accuracy_drop": 0.01}, calibration=True, miss=6.0, prefix_miss=8.0) == four
    assert shortfall({"max_accuracy_drop": 0.01}, {"budget": {"accuracy_drop": 0.02}}, "generic") == pytest.approx(2.0)
    assert shortfall({"max_accuracy_drop": 0.01}, {"budget": {}}, "generic") is None


def _stepped(input_top1: float, per_step: list[float | None]) -> dict:
    """A trial's report: the input's top-1 and each step's eval top-1 (None: not measured)."""
    return {"input": {"metric": {"name": "accuracy", "value": input_top1}},
            "steps": [{"eval": {} if v is None else {"metric": {"name": "accuracy", "value": v}}} for v in per_step]}


def test_the_loss_before_the_last_step_is_read_from_its_eval() -> None:
    acc = {"max_accuracy_drop": 0.01}
    assert prefix_shortfall(acc, _stepped(1.0, [0.25, 0.995, 0.98])) == pytest.approx(0.5)
    assert prefix_shortfall(acc, _stepped(0.9, [0.95, 0.8])) == 0.0  # the prefix beat the input: no loss
    assert prefix_shortfall(acc, _stepped(1.0, [0.25, None, 0.98])) is None
    assert prefix_shortfall(acc, _stepped(1.0, [0.98])) is None  # one step: no prefix
    assert prefix_shortfall({"min_fidelity": 0.99}, _stepped(1.0, [0.9, 0.98])) is None
    # a torch-form step's eval (after distillation) holds the metric under its name
    torch_form = _stepped(1.0, [0.25, None, 0.98])
    torch_form["steps"][1]["eval"] = {"measured": True, "accuracy": 0.97}
    assert prefix_shortfall(acc, torch_form) == pytest.approx(3.0)


def test_a_pruned_trial_whose_recovery_met_the_budget_gets_the_quantize_fixes_on_the_same_prefix() -> None:
    acc = {"max_accuracy_drop": 0.01}
    pruned = [{"type": "prune", "ratio": 0.5}, {"type": "distill", "epochs": 8}, {"type": "quantize", "mode": "static"}]
    fixes = escalations(pruned, acc, calibration=True, miss=2.0, prefix_miss=0.5)
    assert [f[:2] for f in fixes] == [pruned[:2]] * 3  # the pruned, recovered prefix unchanged (stage-cached)
    assert [estimate(f[2:]).label for f in fixes] == [
        "quantize (static percentile 99.99)", "quantize (static entropy)", "quantize (static auto_exclude)"]
    _valid(fixes, train="t", eval="e")
    # the recovery used the whole budget (or more), or it was not measured: train more, as before
    more = [[*pruned[:1], {**pruned[1], "epochs": 16}, pruned[2]]]
    assert escalations(pruned, acc, calibration=True, miss=2.0, prefix_miss=1.0) == more
    assert escalations(pruned, acc, calibration=True, miss=2.0) == more
    # a hopeless quantizer miss tries no fix: more epochs instead
    assert escalations(pruned, acc, calibration=True, miss=50.0, prefix_miss=0.0) == more
    # no fix left for the quantizer (a weight-only step at its smallest block, 8 bits): more epochs
    last = [*pruned[:2], {"type": "quantize", "mode": "int8_weight", "block_size": 32}]
    assert escalations(last, acc, calibration=True, miss=2.0, prefix_miss=0.0) == [
        [*pruned[:1], {**pruned[1], "epochs": 16}, last[2]]]
    # a fix that missed again gets its own next fix (a lower percentile), still on the same prefix
    again = escalations(fixes[0], acc, calibration=True, miss=1.5, prefix_miss=0.5)
    assert [f[2]["calibration"] for f in again][:1] == [{"method": "percentile", "percentile": 99.9}]


def test_a_winner_must_beat_the_input_by_more_than_the_noise() -> None:
    assert noise_margin([10.0, 10.5, 9.5, 10.2, 9.9]) == pytest.approx(0.1)
    assert noise_margin([10.0] * 5) == MIN_NOISE  # never below the floor
    assert beats_input("latency", 8.0, 10.0, 0.1)
    assert not beats_input("latency", 9.5, 10.0, 0.1)  # 5% faster with 10% noise: not an improvement
    assert not beats_input("size", 1000, 1000)
    assert beats_input("size", 999, 1000) and not beats_input("size", None, 1000)
    # paired rounds: a load spike in round 2 hits both models; the per-round ratios stay at ~0.5
    mid, worst = paired_ratio([5.0, 50.0, 5.2, 4.9, 5.1], [10.0, 98.0, 10.1, 10.0, 9.9])
    assert mid == pytest.approx(0.5, abs=0.02) and worst < 0.53
    assert beats_input("latency", mid, 1.0, max(MIN_NOISE, worst - mid))
    # the same file twice: some round is slower, so no improvement
    mid, worst = paired_ratio([10.0, 10.3, 9.8], [10.1, 10.0, 10.0])
    assert worst > 1.0 and not beats_input("latency", mid, 1.0, max(MIN_NOISE, worst - mid))
    dyn, static = [{"type": "quantize", "mode": "dynamic"}], [{"type": "quantize", "mode": "static"}]
    assert barred_winner(dyn, static_possible_on_conv=True) is not None
    assert barred_winner(dyn, static_possible_on_conv=False) is None
    assert barred_winner(static, static_possible_on_conv=True) is None


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


def _fix_of(step: dict, calibration: bool = True, **constraints: float) -> list[dict]:
    """The quantize steps a quality miss of ``[step]`` escalates to, each a step a job accepts."""
    fixes = escalations([step], constraints or {"max_perplexity_increase": 0.1}, calibration=calibration)
    _valid(fixes, train="t", eval="e")
    return [f[-1] for f in fixes]


def test_a_percentile_calibration_that_missed_clips_more_next() -> None:
    pct = {"type": "quantize", "mode": "static", "calibration": {"method": "percentile", "percentile": 99.99}}
    fixes = _fix_of(pct, min_fidelity=0.99)
    assert fixes[0]["calibration"] == {"method": "percentile", "percentile": 99.9}
    assert "auto_exclude" in fixes[-1]
    lowest = {**pct, "calibration": {"method": "percentile", "percentile": 99.9}}
    assert [f.get("calibration") for f in _fix_of(lowest, min_fidelity=0.99)] == [lowest["calibration"]]


def test_an_int4_miss_puts_the_head_and_the_embeddings_at_8_bits() -> None:
    every4 = {"type": "quantize", "mode": "int4", "block_size": 32, "bits": {}}
    assert _fix_of(every4)[0] == {**every4, "bits": None}  # the default policy: the head at 8 bits
    assert [estimate([f]).label for f in (every4, _fix_of(every4)[0])] == ["quantize (int4 b32 bits {})",
                                                                           "quantize (int4 b32)"]
    tables4 = {"type": "quantize", "mode": "int4", "block_size": 32, "quantize_embeddings": True}
    assert _fix_of(tables4)[0] == {**tables4, "quantize_embeddings": None}  # the default: tables at 8 bits
    both4 = {**tables4, "bits": {"*q_proj*": 4}}
    assert {**both4, "bits": {"*q_proj*": 4, "Gather": 8}} in _fix_of(both4)


def test_an_int4_miss_keeps_more_layers_at_8_bits_by_measured_sensitivity() -> None:
    rtn = {"type": "quantize", "mode": "int4", "algorithm": "rtn", "block_size": 32}
    assert [f.get("int8_share") for f in _fix_of(rtn)][:1] == [0.25]
    assert estimate([_fix_of(rtn)[0]]).label == "quantize (int4 rtn b32 8-bit share 0.25)"
    assert {**rtn, "int8_share": 0.5} in _fix_of({**rtn, "int8_share": 0.25})
    # at the last share the next rungs are a data-aware algorithm (same share) and every MatMul at 8 bits
    assert _fix_of({**rtn, "int8_share": 0.5}) == [{**rtn, "int8_share": 0.5, "algorithm": "gptq"},
                                                   {"type": "quantize", "mode": "int8_weight"}]
    assert all("int8_share" not in f for f in _fix_of(rtn, calibration=False))  # its KL needs calibration text


def test_a_weight_only_miss_halves_the_block_down_to_32() -> None:
    assert _fix_of({"type": "quantize", "mode": "int8_weight", "block_size": 64}) == [
        {"type": "quantize", "mode": "int8_weight", "block_size": 32}]
    assert _fix_of({"type": "quantize", "mode": "int8_weight", "block_size": 32}) == []


def test_fp16_enters_a_cpu_space_only_when_measured_faster_in_every_round() -> None:
    assert fp16_dropped("CUDAExecutionProvider", None) is None
    assert fp16_dropped("CPUExecutionProvider", (0.6, 0.7)) is None
    slower = fp16_dropped("CPUExecutionProvider", (1.13, 1.2))
    assert slower is not None and "at 1.13x the input's latency" in slower
    assert fp16_dropped("CPUExecutionProvider", (0.9, 0.99)) is not None  # one round within the noise
    unmeasured = fp16_dropped("CPUExecutionProvider", "the upload is no ONNX file")
    assert unmeasured is not None and "not measured" in unmeasured and "no ONNX file" in unmeasured
    modes = [s[0]["mode"] for s in auto_space("feature-extraction", "onnx", {}, train=False, calibration=True,
                                              fp16=True)]
    assert modes[0] == "fp16"
