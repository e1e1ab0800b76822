"""auto_exclude: on a digits MLP whose first layer is built to be ruined by per-tensor INT8 (an outlier
weight on a pixel that is always 0, so the float model is unchanged), exactly that node stays in float,
the target holds on the worst case, and the report gives the node, the rounds and the size/latency cost."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from models.spec import JobSpec, QuantizeStep
from tests.factories import digits_split
from tests.worker.conftest import DigitsFiles, looping_context
from worker.context import LocalContext
from worker.core import JobCancelled, StepFailed
from worker.passes import sensitivity
from worker.passes.quantize import QuantizePass


def _outlier_model(src: Path, dst: Path) -> str:
    """Copy ``src`` with a 1000x outlier on the first layer's weights for input pixel 0 (always 0 in digits)."""
    m = onnx.load(str(src))
    first = next(n for n in m.graph.node if n.op_type in ("Gemm", "MatMul"))
    init = next(t for t in m.graph.initializer if t.name == first.input[1])
    w = numpy_helper.to_array(init).copy()
    scale = 1000.0 * float(np.abs(w).max())
    if w.shape[0] == 64:  # [in, out] (MatMul)
        w[0, :] = scale
    else:  # [out, in] (Gemm transB)
        w[:, 0] = scale
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dst))
    return first.name


def _two_outlier_model(src: Path, dst: Path) -> tuple[str, str]:
    """``_outlier_model`` plus a second ruined layer: hidden unit 0 of the first layer made dead (zero weights,
    bias -1: 0 after the ReLU, quantized or not) and a 1000x outlier on the second layer's weights for it."""
    first = _outlier_model(src, dst)
    m = onnx.load(str(dst))
    gemms = [n for n in m.graph.node if n.op_type == "Gemm"]
    assert gemms[0].name == first and len(gemms) == 3
    inits = {t.name: t for t in m.graph.initializer}

    def edit(name: str, change: Any) -> None:
        a = numpy_helper.to_array(inits[name]).copy()
        change(a)
        inits[name].CopyFrom(numpy_helper.from_array(a, name))

    edit(gemms[0].input[1], lambda w: w.__setitem__((0, slice(None)), 0.0))  # [out, in] (transB)
    edit(gemms[0].input[2], lambda b: b.__setitem__(0, -1.0))
    edit(gemms[1].input[1], lambda w: w.__setitem__((slice(None), 0), 1000.0 * float(np.abs(w).max())))
    onnx.save(m, str(dst))
    return first, gemms[1].name


def _ctx(tmp_path: Path, files: DigitsFiles, model: Path, calibration: Path | None = None) -> LocalContext:
    data = {"train": "ds_train", "eval": "ds_eval", **({"calibration": "ds_cal"} if calibration else {})}
    spec = JobSpec.model_validate({"model": "mdl_mlp", "task": "image-classification", "data": data})
    datasets = {"ds_train": (files.train, "npz", {}), "ds_eval": (files.eval, "npz", {})}
    if calibration is not None:
        datasets["ds_cal"] = (calibration, "npz", {})
    return LocalContext(
        tmp_path / "work", spec, models={"mdl_mlp": (model, "onnx", {})}, datasets=datasets, device="cpu"
    )


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"pixels": x})[0])


def _step(**auto: object) -> QuantizeStep:
    return QuantizeStep(type="quantize", mode="dynamic", per_channel=False, auto_exclude=auto)


def test_keeps_exactly_the_sensitive_node(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    path = tmp_path / "outlier.onnx"
    sensitive = _outlier_model(digits_mlp.model, path)
    _, (x, _) = digits_split()
    ref = _logits(path, x)
    assert (ref.argmax(1) == _logits(digits_mlp.model, x).argmax(1)).all()  # the float model is unchanged

    ctx = _ctx(tmp_path, digits_mlp, path)
    plain = QuantizePass().run(ctx.load_model("input"), QuantizeStep(type="quantize", per_channel=False), ctx)
    assert plain.model.onnx_path is not None
    ruined = float((_logits(plain.model.onnx_path, x).argmax(1) == ref.argmax(1)).mean())
    assert ruined < 0.5  # per-tensor INT8 of that layer ruins the model

    result = QuantizePass().run(ctx.load_model("input"), _step(min_fidelity=0.99, samples=64), ctx)
    report = result.metrics["auto_exclude"]
    print(report)
    names = {n.name for n in onnx.load(str(result.model.onnx_path)).graph.node}
    assert report["kept_float"] == [sensitive] and report["met"] is True
    assert report["judged_by"] == "top1_agreement" and report["value"] >= 0.99 and report["all_quantized"] < 0.5
    ranked = report["sensitivity"]  # quantized alone: the outlier layer's loss dwarfs the others'
    assert ranked[0]["node"] == sensitive and ranked[0]["min_cosine_alone"] < 0.9
    assert all(r["loss_alone"] < ranked[0]["loss_alone"] / 10 for r in ranked[1:]) and len(ranked) == 3
    assert report["candidates"] == 3 and report["rounds"] == 1 + 3 + 1
    assert f"{sensitive}_MatMul" in names  # the Gemm is still a float MatMul, the others are integer ops
    assert result.metrics["quantized_ops"].get("MatMulInteger", 0) == 2
    assert report["cost"]["size_bytes"] > 40_000  # 64x256 weights in float instead of int8
    assert isinstance(report["cost"]["latency_ms"], float)
    out = _logits(result.model.onnx_path, x)  # judged on 64 calibration samples, holds on the eval set too
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.98


def test_two_ruinous_nodes_both_kept_where_leaving_one_out_cannot_tell_them_from_the_harmless_one(
    tmp_path: Path, digits_mlp: DigitsFiles
) -> None:
    # Either ruined layer quantized ruins the output, so with one left out (the old ranking) the worst sample is
    # as bad for all three; quantized alone, the two stand out and are the two kept, in two greedy rounds.
    path = tmp_path / "two-outliers.onnx"
    ruinous = set(_two_outlier_model(digits_mlp.model, path))
    _, (x, _) = digits_split()
    ref = _logits(path, x)
    assert (ref.argmax(1) == _logits(digits_mlp.model, x).argmax(1)).mean() > 0.95  # still a digits classifier

    ctx = _ctx(tmp_path, digits_mlp, path)
    result = QuantizePass().run(ctx.load_model("input"), _step(min_fidelity=0.99, samples=64, max_nodes=2), ctx)
    report = result.metrics["auto_exclude"]
    assert set(report["kept_float"]) == ruinous and report["met"] is True and report["all_quantized"] < 0.5
    assert {r["node"] for r in report["sensitivity"][:2]} == ruinous and report["rounds"] == 1 + 3 + 2
    assert report["sensitivity"][2]["loss_alone"] < report["sensitivity"][1]["loss_alone"] / 10
    assert result.model.onnx_path is not None
    assert (_logits(result.model.onnx_path, x).argmax(1) == ref.argmax(1)).mean() >= 0.98


def test_nothing_kept_when_everything_quantized_meets_the_target(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    ctx = _ctx(tmp_path, digits_mlp, digits_mlp.model)
    result = QuantizePass().run(ctx.load_model("input"), _step(max_accuracy_drop=0.05, samples=64), ctx)
    report = result.metrics["auto_exclude"]
    assert report["kept_float"] == [] and report["met"] is True and report["rounds"] == 1
    assert report["judged_by"] == "accuracy_drop" and report["value"] <= 0.05
    assert report["cost"]["size_bytes"] == 0


def test_accuracy_target_needs_labelled_calibration(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    (x, _), _ = digits_split()
    cal = tmp_path / "cal.npz"
    np.savez(cal, pixels=x[:40])
    ctx = _ctx(tmp_path, digits_mlp, digits_mlp.model, calibration=cal)
    with pytest.raises(StepFailed) as err:
        QuantizePass().run(ctx.load_model("input"), _step(max_accuracy_drop=0.01), ctx)
    assert err.value.code == "calibration_data_unlabelled"


def test_rank_puts_the_largest_alone_loss_first_then_the_worst_sample() -> None:
    measured = [
        (sensitivity.Score(0.99, 0.995, 0.9990), "attn", "MatMul"),
        (sensitivity.Score(0.98, 0.990, 0.9970), "ffn", "MatMul"),
        (sensitivity.Score(0.99, 0.980, 0.9990), "head", "Gemm"),
        (sensitivity.Score(1.00, 1.000, 1.0000), "tiny", "MatMul"),
    ]
    assert [n for _, n, _ in sensitivity.rank(measured)] == ["ffn", "head", "attn", "tiny"]


def test_exclusion_names_cover_dynamic_gemm_rename() -> None:
    assert sensitivity.exclusion_names([("fc", "Gemm"), ("c", "Conv")], "dynamic") == ["fc", "fc_MatMul", "c"]
    assert sensitivity.exclusion_names([("fc", "Gemm")], "static") == ["fc"]


def test_auto_exclude_spec_needs_one_target_and_an_int8_mode() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        _step()
    with pytest.raises(ValueError, match="exactly one"):
        _step(min_fidelity=0.9, max_accuracy_drop=0.01)
    with pytest.raises(ValueError, match="dynamic and static only"):
        QuantizeStep(type="quantize", mode="fp16", auto_exclude={"min_fidelity": 0.9})


def test_static_qdq_keeps_the_sensitive_node_without_dequantized_weights(
    tmp_path: Path, digits_mlp: DigitsFiles
) -> None:
    path = tmp_path / "outlier.onnx"
    sensitive = _outlier_model(digits_mlp.model, path)
    ctx = _ctx(tmp_path, digits_mlp, path)
    step = QuantizeStep(
        type="quantize", mode="static", per_channel=False, calibration={"samples": 64},
        auto_exclude={"min_fidelity": 0.99, "samples": 64},
    )
    result = QuantizePass().run(ctx.load_model("input"), step, ctx)
    report = result.metrics["auto_exclude"]
    assert report["kept_float"] == [sensitive] and report["met"] is True
    assert result.model.onnx_path is not None
    graph = onnx.load(str(result.model.onnx_path)).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    node = next(n for n in graph.node if n.name == sensitive)
    assert producers.get(node.input[1]) != "DequantizeLinear"  # float weights
    others = [n for n in graph.node if n.op_type == "Gemm" and n.name != sensitive]
    assert others and all(producers.get(n.input[1]) == "DequantizeLinear" for n in others)
    _, (x, _) = digits_split()
    agree = (_logits(result.model.onnx_path, x).argmax(1) == _logits(path, x).argmax(1)).mean()
    assert agree >= 0.98


def _auto_exclude_step(mode: str) -> QuantizeStep:
    return QuantizeStep(type="quantize", mode=mode, auto_exclude={"min_fidelity": 0.99, "samples": 8})


@pytest.mark.usefixtures("fast_cancel_poll")
def test_the_sensitivity_runs_of_a_looping_graph_end_at_a_cancel_within_seconds(tmp_path: Path) -> None:
    ctx = looping_context(tmp_path / "work", cancel_after_s=1.0)
    with pytest.raises(JobCancelled):
        QuantizePass().run(ctx.load_model("input"), _auto_exclude_step("dynamic"), ctx)
    assert ctx.cancel_at is not None and time.monotonic() - ctx.cancel_at <= 10  # the bound
    assert ctx.seen_by[0] == "ort-watchdog"  # the cancel stopped the run itself


def test_the_sensitivity_runs_of_a_looping_graph_fail_with_run_time_limit_past_the_cap(
    tmp_path: Path, run_cap_1s: float
) -> None:
    ctx = looping_context(tmp_path / "work")
    started = time.monotonic()
    with pytest.raises(StepFailed) as failed:
        QuantizePass().run(ctx.load_model("input"), _auto_exclude_step("static"), ctx)
    assert failed.value.code == "run_time_limit" and "(auto_exclude)" in failed.value.message
    assert "MODELPRESS_RUN_MAX_S=1 s" in failed.value.message and time.monotonic() - started < 8
