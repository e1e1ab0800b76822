"""The recipes ``modelpress optimize`` turns its flags into: quantize modes, the INT8 choice, the job spec."""

from __future__ import annotations

from typing import Any

QUANTIZE_MODES = {
    "int8": {"type": "quantize", "mode": "dynamic"},
    "int8-dynamic": {"type": "quantize", "mode": "dynamic"},
    "int8-static": {"type": "quantize", "mode": "static"},
    "fp16": {"type": "quantize", "mode": "fp16"},
    # weight-only, to MatMulNBits (causal LMs above all; the pass's measured defaults)
    "int4": {"type": "quantize", "mode": "int4"},
    "int8-weight": {"type": "quantize", "mode": "int8_weight"},
    # Conv/Gemm/MatMul weights as int8 that ONNX Runtime folds back to float at load: ~4x smaller, float speed
    "int8-folded": {"type": "quantize", "mode": "int8_folded"},
}

CONV_OPS, MATMUL_OPS = ("Conv", "ConvTranspose"), ("MatMul", "Gemm")


def int8_step(model_meta: dict[str, Any] | None, calibrated: bool, eval_only: bool = False) -> tuple[dict[str, Any], str]:
    """The INT8 quantize step that suits the graph, and why: static QDQ for a convolution model with calibration data
    (dynamic INT8 runs convolutions through ConvInteger, slow on CPU), dynamic for a MatMul-heavy one.

    ``calibrated`` means data other than the eval set (train or calibration); with ``eval_only`` the eval set is
    never used for calibration (that would tune the model to the samples its accuracy is then measured on)."""
    ops = (model_meta or {}).get("op_types")
    if not isinstance(ops, dict) or not ops:
        return dict(QUANTIZE_MODES["int8-dynamic"]), "dynamic INT8: the model record lists no op types"
    conv = sum(int(ops.get(op, 0)) for op in CONV_OPS)
    matmul = sum(int(ops.get(op, 0)) for op in MATMUL_OPS)
    counts = f"{conv} Conv and {matmul} MatMul/Gemm nodes"
    if conv and conv >= matmul:
        if calibrated:
            return dict(QUANTIZE_MODES["int8-static"]), (
                f"static INT8 (QDQ): the graph has {conv} Conv nodes and calibration data was given")
        if eval_only:
            return dict(QUANTIZE_MODES["int8-dynamic"]), (
                f"dynamic INT8: the graph has {conv} Conv nodes, but the only data given is the eval set, and "
                "calibrating on the samples the accuracy is measured on would flatter it; give --calibration or "
                "--data (train) for static INT8, faster for convolutions")
        return dict(QUANTIZE_MODES["int8-dynamic"]), (
            f"dynamic INT8: the graph has {conv} Conv nodes but no calibration data was given "
            "(give --calibration or --data for static INT8, faster for convolutions)")
    return dict(QUANTIZE_MODES["int8-dynamic"]), f"dynamic INT8: the graph is MatMul-heavy ({counts})"


def build_optimize_spec(
    model: str,
    train: str | None,
    eval_: str | None,
    calibration: str | None,
    *,
    task: str | None = None,
    prune: float | None = None,
    distill: bool = False,
    finetune: bool = False,
    recover: bool = True,
    quantize: str | None = None,
    epochs: int | None = None,
    max_accuracy_drop: float | None = None,
    max_perplexity_increase: float | None = None,
    queue: str | None = None,
    model_meta: dict[str, Any] | None = None,
    notes: list[str] | None = None,
    latency: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The job spec ``optimize`` submits: prune -> finetune -> distill -> quantize (each optional).

    ``--quantize int8`` becomes static or dynamic from ``model_meta``'s op counts; the reason goes to ``notes``.
    """
    steps: list[dict[str, Any]] = []
    training = {"epochs": epochs} if epochs else {}
    # A causal LM (the upload's inspection says text-generation): LoRA is the fine-tune people mean.
    lm = (task or (model_meta or {}).get("task")) == "text-generation"
    if lm and not task:
        task = "text-generation"
    if prune is not None:
        steps.append({"type": "prune", "method": "structured", "ratio": prune})
        if recover and not distill and not finetune:
            distill = True  # pruning without recovery training loses most of the accuracy
    if finetune:
        steps.append({"type": "finetune", **({"mode": "lora"} if lm else {}), **training})
    if distill:
        steps.append({"type": "distill", "teacher": "input", **training})
    if quantize == "int8":
        step, why = int8_step(model_meta, bool(train or calibration), eval_only=bool(eval_) and not (train or calibration))
        steps.append(step)
        if notes is not None:
            notes.append(why)
    elif quantize == "int8-static" and not (train or calibration):
        raise ValueError("--quantize int8-static needs calibration data apart from the eval set (--calibration FILE "
                         "or --data TRAIN): calibrating on the samples the accuracy is measured on would flatter it")
    elif quantize:
        steps.append(dict(QUANTIZE_MODES[quantize]))
    if not steps:
        raise ValueError("nothing to do: give at least one of --prune, --distill, --finetune, --quantize")
    data = {k: v for k, v in (("train", train), ("eval", eval_), ("calibration", calibration)) if v}
    spec: dict[str, Any] = {"model": model, "data": data, "steps": steps}
    if task:
        spec["task"] = task
    if max_accuracy_drop is not None:
        spec["evaluate"] = {"max_accuracy_drop": max_accuracy_drop}
    if max_perplexity_increase is not None:
        spec.setdefault("evaluate", {})["max_perplexity_increase"] = max_perplexity_increase
    if latency:
        spec.setdefault("evaluate", {})["latency"] = dict(latency)
    if queue:
        spec["queue"] = queue
    return spec


