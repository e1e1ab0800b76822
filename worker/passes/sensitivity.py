"""Sensitivity-guided mixed precision for the quantize step (``auto_exclude``).

Each weighted node (MatMul, Gemm, Conv) is measured by quantizing it alone (every other node in float, the
step's own onnxruntime.quantization settings) on a few calibration samples: its output error, the mean
cosine loss to the float model's output. Nodes are ranked by that error, then the most damaging are kept in
float one by one until the target holds. The step's metrics get which nodes, the ranking, the rounds run
and their cost.

Why not leave-one-out (every node quantized but one): on a 6-layer sentence encoder with 36 such nodes each
adds a small error, and leaving any one out moved the worst sample's cosine by less than the spread between
nodes (all-MiniLM-L6-v2: 0.984-0.991 across nodes, 0.986 all quantized), so the ranking was noise and the greedy
additions stopped short (0.9892 against 0.99); quantized alone, the FFN projections stood out (an FFN
output projection at 0.9987 mean cosine, attention projections at 0.9999 and above).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.spec import ACCURACY_TASKS, AutoExclude, QuantizeStep
from worker.core import ArrayDataset, PassContext, StepFailed, WorkingModel
from worker.ort_guard import RunGuard
from worker.passes.quantizers import ort

# Ops whose weights the quantizer turns into integers: the nodes worth keeping in float.
WEIGHTED_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
LATENCY_RUNS = 20


@dataclass(frozen=True)
class Score:
    """One quantized candidate on the samples: the target's value, the worst and the mean sample's output
    cosine to the float model's."""

    value: float
    min_cosine: float
    mean_cosine: float

    @property
    def loss(self) -> float:
        """The output error a node quantized alone adds: 1 - the mean sample's cosine."""
        return 1.0 - self.mean_cosine


def candidates(path: Path, p: QuantizeStep) -> list[tuple[str, str]]:
    """(name, op) of the weighted nodes the step would quantize (constant weights, not excluded)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    consts = {t.name for t in m.graph.initializer} | {
        o for n in m.graph.node if n.op_type == "Constant" for o in n.output
    }
    excluded = set(p.nodes_to_exclude)
    out = []
    for n in m.graph.node:
        if n.op_type not in WEIGHTED_OPS or n.op_type in p.op_types_to_exclude or n.name in excluded:
            continue
        if len(n.input) > 1 and n.input[1] in consts:
            out.append((n.name, n.op_type))
    return out


def exclusion_names(nodes: list[tuple[str, str]], mode: str) -> list[str]:
    """Names to pass as ``nodes_to_exclude``: dynamic quantization renames a Gemm ``<name>_MatMul`` first."""
    names = []
    for name, op in nodes:
        names.append(name)
        if op == "Gemm" and mode == "dynamic":
            names.append(f"{name}_MatMul")
    return names


def rank(measured: list[tuple[Score, str, str]]) -> list[tuple[Score, str, str]]:
    """(score quantized alone, name, op) most damaging first: the largest output loss, then the lowest worst
    sample's cosine; equal scores keep the graph's order."""
    return sorted(measured, key=lambda r: (-r[0].loss, r[0].min_cosine))


def _outputs(path: Path, data: ArrayDataset, guard: RunGuard) -> np.ndarray:
    import onnx

    from worker.evaluate import _Runner, eval_batch_size, make_session

    batch = eval_batch_size(onnx.load(str(path), load_external_data=False), 64, 1)  # as the evaluation runs it
    runner = _Runner(make_session(path, 1))
    outs = runner.run_all(data.inputs, batch, guard.check_cancelled, guard)
    return outs[runner.output_names[0]]


class _Judge:
    """Scores a quantized model's outputs against the float model's on the calibration samples."""

    def __init__(self, target: AutoExclude, task: str, data: ArrayDataset, reference: np.ndarray) -> None:
        from worker.evaluate import embeddings

        self.target, self.data, self.reference = target, data, reference
        self.mask = data.inputs.get("attention_mask")
        self.ref_emb = embeddings(reference, self.mask)
        logits = reference.ndim == 2 and reference.shape[1] > 1
        self.classifier = task in ACCURACY_TASKS and logits
        if target.max_accuracy_drop is not None:
            if data.labels is None or not logits:
                raise StepFailed(
                    "calibration_data_unlabelled",
                    "auto_exclude.max_accuracy_drop needs labelled calibration data for a classifier",
                )
            self.judged_by = "accuracy_drop"
            self.ref_acc = float((reference.argmax(1) == data.labels).mean())
        else:
            self.judged_by = "top1_agreement" if self.classifier else "min_cosine"

    def score(self, out: np.ndarray) -> Score:
        from worker.evaluate import _cosine_rows, embeddings

        emb = embeddings(out, self.mask)
        cos = _cosine_rows(emb, self.ref_emb) if emb.shape == self.ref_emb.shape else np.full(1, -1.0)
        min_cos, mean_cos = float(cos.min()), float(cos.mean())
        if self.judged_by == "accuracy_drop":
            assert self.data.labels is not None
            value = self.ref_acc - float((out.argmax(1) == self.data.labels).mean())
        elif self.judged_by == "top1_agreement":
            value = float((out.argmax(1) == self.reference.argmax(1)).mean())
        else:
            value = min_cos
        return Score(value, min_cos, mean_cos)

    def met(self, s: Score) -> bool:
        if self.target.max_accuracy_drop is not None:
            return s.value <= self.target.max_accuracy_drop + 1e-12
        return s.value >= float(self.target.min_fidelity or 0.0) - 1e-12


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    Path(str(path) + ".data").unlink(missing_ok=True)


def _latency_ms(path: Path, data: ArrayDataset, guard: RunGuard) -> float:
    from worker.evaluate import make_session, measure_latency

    batch = {k: v[:1] for k, v in data.inputs.items()}
    measured = measure_latency(make_session(path, 1), batch, 3, LATENCY_RUNS, guard.check_cancelled, guard)
    return float(measured["ms"]["median"])


def select(
    pre: Path, p: QuantizeStep, model: WorkingModel, ctx: PassContext
) -> tuple[list[str], dict[str, Any]]:
    """The node names to keep in float so that ``p.auto_exclude``'s target holds, and the report of it.

    Every run of a candidate (calibration included) is under one guard, the phase's: bounded and
    cancellable (worker/ort_guard.py)."""
    with ort.calibration_guard(ctx, pre, "auto_exclude") as guard:
        return _select(pre, p, model, ctx, guard)


def _select(
    pre: Path, p: QuantizeStep, model: WorkingModel, ctx: PassContext, guard: RunGuard
) -> tuple[list[str], dict[str, Any]]:
    from worker.formats.onnx_model import model_size_bytes

    target = p.auto_exclude
    assert target is not None
    data = ctx.dataset("calibration", model)
    if data is None or len(data) == 0:
        raise StepFailed("calibration_data_missing", "auto_exclude measures sensitivity on calibration data")
    samples = data.take(target.samples)
    nodes = candidates(pre, p)
    if len(nodes) + 1 > target.max_rounds:
        raise StepFailed(
            "too_many_nodes",
            f"auto_exclude: {len(nodes)} candidate nodes need more than max_rounds={target.max_rounds} "
            "quantize+evaluate rounds; raise max_rounds or exclude op types",
        )
    judge = _Judge(target, ctx.spec.task, samples, _outputs(pre, samples, guard))
    rounds = 0

    def quantize(kept: list[tuple[str, str]], keep_file: bool = False) -> tuple[Score, Path]:
        nonlocal rounds
        ctx.check_cancelled()
        rounds += 1
        names = [*p.nodes_to_exclude, *exclusion_names(kept, p.mode)]
        step = p.model_copy(update={"nodes_to_exclude": names, "auto_exclude": None})
        out = ort.dynamic(pre, step, ctx) if p.mode == "dynamic" else ort.static(pre, step, model, ctx)[0]
        score = judge.score(_outputs(out, samples, guard))
        if not keep_file:
            _remove(out)
        return score, out

    ctx.progress("auto_exclude: all nodes quantized", fraction=0.0)
    full, full_path = quantize([], keep_file=True)
    report: dict[str, Any] = {
        "target": target.model_dump(include={"min_fidelity", "max_accuracy_drop"}, exclude_none=True),
        "judged_by": judge.judged_by,
        "samples": len(samples),
        "candidates": len(nodes),
        "all_quantized": full.value,
    }
    kept: list[tuple[str, str]] = []
    final, final_path = full, full_path
    ranking: list[tuple[Score, str, str]] = []
    if not judge.met(full):
        for i, (name, op) in enumerate(nodes):
            ctx.progress(f"auto_exclude: quantizing {name} alone", fraction=0.8 * i / max(1, len(nodes)))
            s, _ = quantize([n for n in nodes if n[0] != name])
            ranking.append((s, name, op))
        ranking = rank(ranking)
        for name, op in [(n, o) for _, n, o in ranking]:
            if len(kept) >= target.max_nodes or rounds >= target.max_rounds:
                break
            kept.append((name, op))
            ctx.progress(f"auto_exclude: keeping {len(kept)} node(s) in float", fraction=0.9)
            score, path = quantize(kept, keep_file=True)
            if final_path != full_path:
                _remove(final_path)
            final, final_path = score, path
            if judge.met(score):
                break
    met = judge.met(final)
    size_full, size_final = model_size_bytes(full_path), model_size_bytes(final_path)
    lat_full = _latency_ms(full_path, samples, guard)
    lat_final = lat_full if final_path == full_path else _latency_ms(final_path, samples, guard)
    for path in {full_path, final_path}:
        _remove(path)
    report.update(
        {
            "kept_float": [name for name, _ in kept],
            "value": final.value,
            "met": met,
            "rounds": rounds,
            "sensitivity": [
                {"node": n, "op": o, "loss_alone": round(c.loss, 7), "min_cosine_alone": round(c.min_cosine, 6)}
                for c, n, o in ranking[:20]
            ],
            "cost": {
                "size_bytes": size_final - size_full,
                "latency_ms": lat_final - lat_full,
                "size_bytes_all_quantized": size_full,
                "latency_ms_all_quantized": lat_full,
            },
        }
    )
    ctx.log(
        "auto_exclude: kept nodes in float",
        nodes=report["kept_float"],
        met=met,
        value=final.value,
        rounds=rounds,
    )
    if not met:
        ctx.log("auto_exclude: the target does not hold within max_nodes/max_rounds", target=report["target"])
    return exclusion_names(kept, p.mode), report
