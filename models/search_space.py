"""The search's trial space and its decisions (pure: no torch, no DB, no ORT).

``candidates`` derives the ``auto`` space from the task, the model and the data given, or takes an explicit
one, and attaches a cheap estimate to each trial (cost, expected size/latency ratio to the input, risk);
``skip_reason`` says whether a pending trial can still win given the trials that finished (its optimistic
``floor`` against the best measured); ``escalations`` are the recipes a quality miss calls for; ``meets``
judges a trial's report against the constraints; ``pareto`` keeps the non-dominated trials;
``noise_margin`` and ``beats_input`` decide whether a winner is better than the input at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from models.formats import MODEL_FORMATS
from models.objectives import MIN_NOISE, OBJECTIVES
from models.spec import CLASSIFICATION_TASKS, step_label

# A trial's optimistic floor must beat the best so far on the objective by this fraction to be started.
MIN_GAIN = 0.02
# Recovery epochs for a pruned trial, per unit of ratio (0.25 -> 2, 0.5 -> 4); a miss doubles them up to this.
EPOCHS_PER_RATIO = 8
MAX_RECOVERY_EPOCHS = 16
# A quantize recipe's fixes (calibration, per-channel, auto_exclude, block size) are tried on a miss at most
# this many times the allowed loss (1.4x: worth it; a static cosine of 0.19 against 0.99, 81x: hopeless).
FIX_REACH = 5.0
# Conv families of Hugging Face image models (their graphs are Conv-heavy: static QDQ, never dynamic INT8).
CONV_MODEL_TYPES = frozenset({"resnet", "convnext", "convnextv2", "mobilenet_v1", "mobilenet_v2", "efficientnet",
                              "regnet", "bit", "mobilevit", "levit", "van", "poolformer"})
CONV_OPS = ("Conv", "ConvTranspose", "QLinearConv", "ConvInteger")
MATMUL_OPS = ("MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "QLinearMatMul")

# Per-step estimates: (cost in "quantize units", size ratio, latency ratio, risk of a metric loss).
_QUANTIZE: dict[str, tuple[float, float, float, float]] = {
    "fp16": (1.0, 0.5, 0.9, 0.05),
    "dynamic": (1.0, 0.27, 0.8, 0.2),
    "int8_weight": (1.0, 0.27, 0.9, 0.15),
    "int8_folded": (1.0, 0.26, 1.0, 0.05),
    "int4": (1.2, 0.15, 0.8, 0.4),
    "static": (2.0, 0.27, 0.6, 0.35),
}
# Optimistic floors (size ratio, latency ratio) no trial of the mode gets below: the stored bits of a weight
# over 32 (scales and zero points only add to it) and, for latency, the best speed-up the kernels give.
_FLOORS: dict[str, tuple[float, float]] = {
    "fp16": (0.5, 0.3),
    "dynamic": (0.25, 0.25),
    "int8_weight": (0.25, 0.3),
    "int8_folded": (0.25, 1.0),  # folded to float at load: float kernels, no speed-up of its own
    "int4": (0.125, 0.2),
    "static": (0.25, 0.2),
}


@dataclass(frozen=True)
class Candidate:
    """One trial to run: its steps (JSON step dicts) and the estimate used to order and skip it."""

    steps: list[dict[str, Any]]
    cost: float
    size_ratio: float
    latency_ratio: float
    risk: float
    label: str = ""
    size_floor: float = 0.0
    latency_floor: float = 0.0

    def ratio(self, objective: str) -> float:
        """The estimated objective (size or latency) as a fraction of the input model's."""
        return float(getattr(self, OBJECTIVES[objective].estimate))

    def floor(self, objective: str) -> float:
        """The optimistic bound of the objective ratio: no run of these steps can measure below it."""
        return float(getattr(self, OBJECTIVES[objective].floor))


def _step_estimate(step: Mapping[str, Any]) -> tuple[float, float, float, float]:
    kind = step.get("type")
    if kind == "quantize":
        mode = str(step.get("mode", "dynamic"))
        cost, size, lat, risk = _QUANTIZE.get(mode, (1.0, 0.5, 0.9, 0.2))
        if mode in ("int4", "int8_weight") and step.get("algorithm") in ("hqq", "gptq"):
            cost, risk = cost * (2.0 if step["algorithm"] == "hqq" else 4.0), risk * 0.6
        if mode in ("int4", "int8_weight") and step.get("block_size"):
            risk *= (int(step["block_size"]) / 32) ** 0.5
        return cost, size, lat, risk
    if kind == "prune":
        keep = 1.0 - float(step.get("ratio", 0.5))
        return 5.0, keep, max(keep, 0.2), float(step.get("ratio", 0.5))
    if kind in ("finetune", "distill"):
        epochs = int(step.get("epochs", 3))
        student = step.get("student") or {}
        ratio = 1.0
        if isinstance(student, Mapping) and "layers" in student:
            ratio = 0.6  # a layer-dropped student: fewer blocks, same embeddings and head
        # Training recovers accuracy: it lowers the risk the pruning before it took.
        return 10.0 * epochs, ratio, ratio, -0.5
    return 3.0, 1.0, 1.0, 0.0  # export and anything else: no change expected


def _step_floor(step: Mapping[str, Any]) -> tuple[float, float]:
    """(size, latency) floors of one step: quantize by its mode; structured pruning at ratio r keeps at least
    (1 - r)^2 of a layer's weights (both its inputs and outputs shrink); a layer-dropped student keeps its
    share of the layers; anything else cannot shrink the model."""
    kind = step.get("type")
    if kind == "quantize":
        return _FLOORS.get(str(step.get("mode", "dynamic")), (0.125, 0.2))
    if kind == "prune":
        keep = (1.0 - float(step.get("ratio", 0.5))) ** 2
        return keep, keep
    if kind == "distill" and isinstance(step.get("student"), Mapping) and "layers" in step["student"]:
        return 0.3, 0.3
    return 1.0, 1.0


def estimate(steps: Sequence[Mapping[str, Any]]) -> Candidate:
    """A trial's estimate: costs add up, ratios and floors multiply, risks add (recovery training subtracts)."""
    cost, size, lat, risk, fsize, flat = 0.0, 1.0, 1.0, 0.0, 1.0, 1.0
    for step in steps:
        c, s, la, r = _step_estimate(step)
        fs, fl = _step_floor(step)
        cost, size, lat, fsize, flat = cost + c, size * s, lat * la, fsize * fs, flat * fl
        risk = max(0.0, risk + r)
    return Candidate([dict(s) for s in steps], cost, size, lat, risk, label=" + ".join(step_label(s) for s in steps),
                     size_floor=fsize, latency_floor=flat)


def conv_heavy(model_format: str, meta: Mapping[str, Any]) -> bool:
    """Whether the upload's graph is mostly convolutions (the inspection's op counts, or an hf Conv family)."""
    ops = meta.get("op_types") or {}
    if isinstance(ops, Mapping) and ops:
        conv = sum(int(ops.get(op, 0)) for op in CONV_OPS)
        return conv > 0 and conv >= sum(int(ops.get(op, 0)) for op in MATMUL_OPS)
    config = meta.get("config") or {}
    model_type = config.get("model_type") if isinstance(config, Mapping) else None
    return model_format == "hf" and str(model_type or "").lower() in CONV_MODEL_TYPES


def recovery_epochs(ratio: float) -> int:
    """Distillation epochs that pair with a pruning ratio: more of the network cut, more recovery."""
    return max(2, round(float(ratio) * EPOCHS_PER_RATIO))


CPU = "CPUExecutionProvider"
FP16 = {"type": "quantize", "mode": "fp16"}
FOLDED = {"type": "quantize", "mode": "int8_folded"}


def fp16_dropped(provider: str, measured: tuple[float, float] | str | None) -> str | None:
    """Why fp16 stays out of an ``auto`` space on ``provider`` (None: it goes in). Off the CPU provider it
    goes in; on it (which runs most float16 graphs slower than float32: Casts around kernels it lacks) only
    when measured faster than the input in every interleaved round: ``measured`` is the paired ``(median,
    worst)`` latency ratio of a quick fp16 conversion to the input, or why it was not measured."""
    if provider != CPU:
        return None
    if measured is None or isinstance(measured, str):
        return f"not measured on {provider} ({measured or 'no probe'}); that provider runs most float16 graphs " \
               "slower than float32"
    mid, worst = measured
    if worst < 1.0 - MIN_NOISE:
        return None
    return (f"measured on {provider} at {mid:.2f}x the input's latency (worst round {worst:.2f}x): not faster "
            "in every round")


def auto_space(task: str, model_format: str, meta: Mapping[str, Any], *, train: bool,
               calibration: bool, provider: str = CPU, fp16: bool | None = None,
               objective: str | None = None) -> list[list[dict[str, Any]]]:
    """The ``auto`` candidates (3-8): post-training recipes without train data; prune ratios with recovery
    distillation and layer-dropped students with it; INT4 algorithms and block sizes for causal LMs.

    Conv-heavy graphs with data get static QDQ INT8 and no dynamic INT8 (ORT's ConvInteger runs slower
    than float); beside it, with or without data, ``int8_folded`` (int8 weights ORT folds to float at load:
    a quarter of the bytes at float speed, where static QDQ on depthwise and squeeze-excitation blocks ran
    slower than float), alone and after each pruning; for ``objective`` size it alone follows a pruning
    (smaller than static QDQ on the same prefix, whose activation scales and zero points only add bytes, and it
    loses less: activations stay float), so each ratio's recovery ladder is tried once within the budget; fp16
    where ``fp16`` says (see :func:`fp16_dropped`; None: only off the CPU provider)."""
    if task == "text-generation":
        if calibration:  # GPTQ first: on real pretrained LLMs (bench.zoo) it lost +4-5 % where RTN lost +70-80 %
            return [
                [{"type": "quantize", "mode": "int4", "algorithm": "gptq", "quantize_embeddings": True}],
                [{"type": "quantize", "mode": "int4", "algorithm": "gptq"}],
                [{"type": "quantize", "mode": "int4", "algorithm": "gptq", "block_size": 32}],
                [{"type": "quantize", "mode": "int8_weight"}],
            ]
        return [
            [{"type": "quantize", "mode": "int8_weight"}],
            [{"type": "quantize", "mode": "int4", "algorithm": "rtn", "block_size": 32}],
            [{"type": "quantize", "mode": "int4", "algorithm": "rtn", "block_size": 128}],
            [{"type": "quantize", "mode": "int4", "algorithm": "hqq", "block_size": 64}],
        ]
    data = calibration or train
    static = {"type": "quantize", "mode": "static"}
    conv = conv_heavy(model_format, meta)
    int8 = static if conv and data else {"type": "quantize", "mode": "dynamic"}
    space: list[list[dict[str, Any]]] = [[dict(FP16)]] if (provider != CPU if fp16 is None else fp16) else []
    space.append([dict(int8)])
    if data and int8 is not static:
        space.append([dict(static)])
    if not conv:  # MatMul weights at 8 bits, activations float: smaller at the least risk
        space.append([{"type": "quantize", "mode": "int8_weight"}])
    last = [dict(FOLDED)] if conv and objective == "size" else [dict(int8), dict(FOLDED)] if conv else [dict(int8)]
    if conv:  # Conv weights at 8 bits, folded to float at load: smaller at float speed and the least risk
        space.append([dict(FOLDED)])
    if train:
        for ratio in (0.25, 0.5):
            recover = {"type": "distill", "teacher": "input", "epochs": recovery_epochs(ratio)}
            space += [[{"type": "prune", "ratio": ratio}, dict(recover), q] for q in last]
        layers = meta.get("layers")
        if MODEL_FORMATS[model_format].transformers and isinstance(layers, int) and layers >= 2:
            space.append([{"type": "distill", "teacher": "input", "epochs": 2, "student": {"layers": layers // 2}},
                          dict(int8)])
    return space


def _quality_target(constraints: Mapping[str, Any]) -> dict[str, float] | None:
    """The ``auto_exclude`` target a search's constraints call for (None: no accuracy/fidelity constraint)."""
    if _num(constraints.get("min_fidelity")) is not None:
        return {"min_fidelity": min(1.0, max(1e-6, float(constraints["min_fidelity"])))}
    if _num(constraints.get("max_accuracy_drop")) is not None:
        return {"max_accuracy_drop": float(constraints["max_accuracy_drop"])}
    return None


# Percentile calibration that missed clips more outliers next: 99.999 (the default) -> 99.99 -> 99.9.
PERCENTILE_STEPS = (99.99, 99.9)
# int4 trials that missed keep the layers whose 4 bits move the output most at 8 bits: this share, then more.
INT8_SHARE_STEPS = (0.25, 0.5)
# SmoothQuant's migration strength a dynamic INT8 miss tries first (all-MiniLM-L6-v2, 32 calibration rows: worst
# cosine 0.986 plain, 0.970 at the paper's 0.5, 0.994 at 0.75, 0.994 at 0.8, 0.991 at 0.9; no latency cost).
SMOOTH_ALPHA = 0.75
# The smallest block a weight-only miss halves its block down to.
MIN_FIX_BLOCK = 32


def _calibration_fixes(q: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Static INT8: minmax calibration -> percentile and entropy; a percentile that missed -> a lower one."""
    cal = dict(q.get("calibration") or {})
    method = cal.get("method", "minmax")
    if method == "minmax":
        return [{**q, "calibration": {**cal, "method": "percentile", "percentile": PERCENTILE_STEPS[0]}},
                {**q, "calibration": {**cal, "method": "entropy"}}]
    if method == "percentile":
        lower = [p for p in PERCENTILE_STEPS if p < float(cal.get("percentile", 99.999))]
        return [{**q, "calibration": {**cal, "percentile": lower[0]}}] if lower else []
    return []


def _weight_only_fixes(q: Mapping[str, Any], calibration: bool) -> list[dict[str, Any]]:
    """int4 / int8_weight: a smaller block; (int4) the head and the embedding table at 8 bits where they were
    at 4, more layers at 8 bits by measured sensitivity (``int8_share``, needs calibration text), a
    data-aware algorithm, every MatMul at 8 bits."""
    fixes: list[dict[str, Any]] = []
    block = int(q.get("block_size") or 64)
    if block > MIN_FIX_BLOCK:
        fixes.append({**q, "block_size": block // 2})
    if q.get("mode") != "int4":
        return fixes
    bits = q.get("bits")
    if isinstance(bits, Mapping) and 8 not in bits.values():
        fixes.append({**q, "bits": None})  # the default policy: the output head at 8 bits
    if q.get("quantize_embeddings") is True:  # tables at 4 bits: at 8 (the default unless the head is tied)
        fixes.append({**q, "bits": {**bits, "Gather": 8}} if isinstance(bits, Mapping)
                     else {**q, "quantize_embeddings": None})
    share = float(q.get("int8_share") or 0.0)
    more = [x for x in INT8_SHARE_STEPS if x > share]
    if calibration and more:
        fixes.append({**q, "int8_share": more[0]})
    if q.get("algorithm") in (None, "rtn"):
        fixes.append({**q, "algorithm": "gptq" if calibration else "hqq"})
    fixes.append({"type": "quantize", "mode": "int8_weight"})  # every MatMul at 8 bits
    return fixes


def _quantize_fixes(q: Mapping[str, Any], constraints: Mapping[str, Any], calibration: bool) -> list[dict[str, Any]]:
    """The quantize recipes that fix a quality miss of ``q``, least costly first: per-channel weights; static's
    calibration methods; dynamic's SmoothQuant scales (no run-time cost); sensitivity-guided ``auto_exclude``
    (on the smoothed graph where ``q`` was smoothed), then the same on more rows at half the loss."""
    mode = q.get("mode", "dynamic")
    if mode in ("int4", "int8_weight"):
        return _weight_only_fixes(q, calibration)
    if mode not in ("dynamic", "static"):
        return []
    fixes: list[dict[str, Any]] = []
    if q.get("per_channel") is False:
        fixes.append({**q, "per_channel": True})
    if mode == "static":
        fixes += _calibration_fixes(q)
    target = _quality_target(constraints)
    ae = q.get("auto_exclude")
    if mode == "dynamic" and calibration and target is not None and q.get("smooth") is None and not ae:
        fixes.append({**q, "smooth": SMOOTH_ALPHA})  # free at run time: before keeping anything in float
    if calibration and target is not None and not ae:
        fixes.append({**q, "auto_exclude": target})
    elif isinstance(ae, Mapping) and int(ae.get("samples", 32)) < 128:
        # met on its few calibration samples, missed on the eval set: measure on more, keep more in float, and
        # aim at half the loss allowed (a calibration set smaller than the samples asked gives no more rows, and
        # the eval rows run one request at a time where the calibration judge saw them batched)
        fixes.append({**q, "auto_exclude": {**_halved_loss(ae), "samples": 4 * int(ae.get("samples", 32)),
                                            "max_nodes": min(256, 2 * int(ae.get("max_nodes", 8)))}})
    return fixes


def _halved_loss(ae: Mapping[str, Any]) -> dict[str, Any]:
    """``auto_exclude``'s target with half the loss it allowed: ``min_fidelity`` 0.99 -> 0.995, ``max_accuracy_drop``
    0.01 -> 0.005."""
    if _num(ae.get("min_fidelity")) is not None:
        return {**ae, "min_fidelity": 1.0 - (1.0 - float(ae["min_fidelity"])) / 2}
    if _num(ae.get("max_accuracy_drop")) is not None:
        return {**ae, "max_accuracy_drop": float(ae["max_accuracy_drop"]) / 2}
    return dict(ae)


def prefix_shortfall(constraints: Mapping[str, Any], report: Mapping[str, Any]) -> float | None:
    """How far the model before a trial's last step (e.g. pruned and distilled, not yet quantized) was from
    ``max_accuracy_drop``, in multiples of the drop allowed (the step before last's eval of the input's
    headline metric against the input's); None where not measured (no such constraint, one step, no metric
    there)."""
    allowed = _num(constraints.get("max_accuracy_drop"))
    steps = report.get("steps") or []
    if allowed is None or len(steps) < 2:
        return None
    metric = (report.get("input") or {}).get("metric") or {}
    start, after = _num(metric.get("value")), steps[-2].get("eval") or {}
    # an ONNX-form step's eval names its metric; a torch-form one (e.g. after distillation) has it by name
    before = _num((after.get("metric") or {}).get("value"))
    if before is None and metric.get("name"):
        before = _num(after.get(str(metric["name"])))
    if before is None or start is None:
        return None
    return max(0.0, start - before) / max(allowed, 1e-6)


def escalations(steps: Sequence[Mapping[str, Any]], constraints: Mapping[str, Any], *,
                calibration: bool, miss: float | None = None,
                prefix_miss: float | None = None) -> list[list[dict[str, Any]]]:
    """The trials a quality (accuracy, fidelity, perplexity) miss of ``steps`` escalates to: a quantize step
    gets the recipes that fix it (per-channel, calibration method and a lower percentile, SmoothQuant scales
    (dynamic), sensitivity-guided ``auto_exclude``; smaller weight-only blocks, the INT4 head and embeddings at 8 bits, a larger
    ``int8_share``, a data-aware algorithm, 8 bits); a pruned trial gets twice the
    recovery epochs (four times them where the model before the last step, or else the trial, lost more than
    ``FIX_REACH`` times the allowed loss; up to ``MAX_RECOVERY_EPOCHS``), its loss being the pruning's, unless its recovery
    already met the budget before the final quantize step (``prefix_miss``, :func:`prefix_shortfall`, below
    1): then the loss is the quantizer's and that step's fixes come instead, on the same (stage-cached)
    pruned and recovered prefix (more epochs only once no fix is left). ``miss``: the trial's
    ``shortfall``; past ``FIX_REACH`` times the allowed loss no quantize fix is tried (None: unknown, tried)."""
    plain = [dict(s) for s in steps]
    fixable = bool(plain) and plain[-1].get("type") == "quantize" and (miss is None or miss <= FIX_REACH)
    if any(s.get("type") == "prune" for s in plain):  # a pruned model's loss is the pruning's: train more
        if fixable and prefix_miss is not None and prefix_miss < 1.0:
            fixes = _quantize_fixes(plain[-1], constraints, calibration)
            if fixes:
                return [[*plain[:-1], fix] for fix in fixes]
        recover = [i for i, s in enumerate(plain) if s.get("type") in ("distill", "finetune") and not s.get("student")]
        if not recover or int(plain[recover[-1]].get("epochs", 3)) >= MAX_RECOVERY_EPOCHS:
            return []
        i = recover[-1]
        more = [dict(s) for s in plain]
        lost = prefix_miss if prefix_miss is not None else miss
        factor = 4 if lost is not None and lost > FIX_REACH else 2  # far past the budget: skip a rung
        more[i] = {**plain[i], "epochs": min(MAX_RECOVERY_EPOCHS, int(plain[i].get("epochs", 3)) * factor)}
        return [more]
    if fixable:
        return [[*plain[:-1], fix] for fix in _quantize_fixes(plain[-1], constraints, calibration)]
    return []


def candidates(space: Sequence[Sequence[Mapping[str, Any]]]) -> list[Candidate]:
    """The trials in the order they run: cheapest first (ties keep the given order), duplicates dropped."""
    seen: set[str] = set()
    out: list[Candidate] = []
    for steps in space:
        key = repr([sorted(s.items()) for s in steps])
        if key in seen:
            continue
        seen.add(key)
        out.append(estimate(steps))
    return sorted(out, key=lambda c: c.cost)


@dataclass
class Outcome:
    """A finished trial as the search sees it: whether it met the constraints, its measured ratios."""

    met: bool
    objective_ratio: float | None
    risk: float
    reasons: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)


def _family(steps: Sequence[Mapping[str, Any]]) -> tuple[str, tuple[float, ...]]:
    """A trial's recipe without its aggressiveness (prune ratios, INT4 block sizes), and that aggressiveness."""
    knobs: list[float] = []
    plain: list[dict[str, Any]] = []
    for s in steps:
        s = dict(s)
        if s.get("type") == "prune":
            knobs.append(float(s.pop("ratio", 0.5)))
        if s.get("type") == "quantize" and s.get("block_size"):
            knobs.append(float(s.pop("block_size")))
        plain.append(s)
    return repr([sorted(s.items()) for s in plain]), tuple(knobs)


def skip_reason(cand: Candidate, objective: str, finished: Sequence[Outcome]) -> str | None:
    """Why a pending trial cannot win (None: start it). The budget is spent unless one of these holds:

    * cannot beat the best: a trial that met the constraints already measured an objective ratio that the
      candidate's optimistic floor (``Candidate.floor``: fewest bits a weight is stored in, the pruned
      share of the weights, the best kernel speed-up) does not beat by ``MIN_GAIN``;
    * dominated: the same recipe at most as aggressive (a lower or equal prune ratio, a smaller or equal
      INT4 block) already missed the accuracy/fidelity/perplexity constraints.
    """
    met = [o.objective_ratio for o in finished if o.met and o.objective_ratio is not None]
    if met and cand.floor(objective) >= min(met) * (1.0 - MIN_GAIN):
        return (f"cannot beat the best: {objective} ratio at best {cand.floor(objective):.3f} vs "
                f"{min(met):.3f} measured")
    family, knobs = _family(cand.steps)
    for o in finished:
        if o.met or not o.steps or not any(r.startswith("quality") for r in o.reasons):
            continue
        theirs, their_knobs = _family(o.steps)
        if theirs == family and len(knobs) == len(their_knobs) and all(
                t <= c for t, c in zip(their_knobs, knobs, strict=True)):
            return "dominated: the same recipe, at most as aggressive, missed the constraints"
    return None


def barred_winner(steps: Sequence[Mapping[str, Any]], static_possible_on_conv: bool) -> str | None:
    """Why a trial may not win whatever it measured (None: it may): dynamic INT8 on a Conv-heavy graph when
    static QDQ is possible (ORT's ConvInteger runs Conv slower than float; static is the same size)."""
    last = steps[-1] if steps else {}
    if static_possible_on_conv and last.get("type") == "quantize" and last.get("mode", "dynamic") == "dynamic":
        return "dynamic INT8 on a Conv-heavy graph where static QDQ is possible"
    return None


def noise_margin(rounds: Sequence[float]) -> float:
    """The relative spread of a model's interleaved round medians, (max - min) / median: how much two
    measurements of the same model differ on this machine now."""
    if len(rounds) < 2:
        return MIN_NOISE
    mid = sorted(rounds)[len(rounds) // 2]
    return max(MIN_NOISE, (max(rounds) - min(rounds)) / mid) if mid > 0 else MIN_NOISE


def beats_input(objective: str, value: float | None, input_value: float | None, margin: float = 0.0) -> bool:
    """Whether a trial's objective value (bytes or ms) is better than the input's by more than ``margin``
    (a fraction; sizes are exact, latencies pass their measured noise)."""
    if value is None or not input_value:
        return False
    return value < input_value * (1.0 - margin)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def worst_fidelity(report: Mapping[str, Any], task: str) -> float | None:
    """The fidelity ``min_fidelity`` is judged on: top-1 agreement for classifiers, else the lowest per-sample
    cosine similarity to the input model's outputs."""
    fid = report.get("fidelity") or (report.get("output") or {}).get("fidelity") or {}
    if task in CLASSIFICATION_TASKS and _num(fid.get("top1_agreement")) is not None:
        return _num(fid.get("top1_agreement"))
    return _num(fid.get("min_cosine"))


def shortfall(constraints: Mapping[str, Any], report: Mapping[str, Any], task: str) -> float | None:
    """How far a trial's quality is from its constraints, in multiples of the loss allowed (the worst of
    accuracy drop / max drop, (1 - worst fidelity) / (1 - min fidelity), perplexity increase / max
    increase); None when a constrained quality was not measured."""
    ratios: list[float] = []
    pairs = ((_num((report.get("budget") or {}).get("accuracy_drop")), _num(constraints.get("max_accuracy_drop"))),
             (_num((report.get("budget") or {}).get("perplexity_increase")),
              _num(constraints.get("max_perplexity_increase"))))
    for lost, allowed in pairs:
        if allowed is not None:
            if lost is None:
                return None
            ratios.append(max(0.0, lost) / max(allowed, 1e-6))
    target = _num(constraints.get("min_fidelity"))
    if target is not None:
        worst = worst_fidelity(report, task)
        if worst is None:
            return None
        ratios.append(max(0.0, 1.0 - worst) / max(1.0 - target, 1e-6))
    return max(ratios, default=0.0)


def meets(constraints: Mapping[str, Any], report: Mapping[str, Any], task: str,
          latency_ms: float | None = None) -> list[str]:
    """The constraints a trial's report misses (empty: it meets them all). Accuracy, fidelity and
    perplexity misses start with ``quality``; ``latency_ms`` overrides the report's (re-measured)."""
    out: list[str] = []
    output = report.get("output") or {}
    drop = _num((report.get("budget") or {}).get("accuracy_drop"))
    limit = _num(constraints.get("max_accuracy_drop"))
    worst_task = (report.get("budget") or {}).get("task")  # a multi-task model's budget: the worst task's drop
    if limit is not None and (drop is None or drop > limit + 1e-12):
        on = f" on task {worst_task!r}" if worst_task else ""
        out.append(f"quality: accuracy drop {_points(drop)}{on} > {_points(limit)}")
    limit = _num(constraints.get("min_fidelity"))
    worst = worst_fidelity(report, task)
    if limit is not None and (worst is None or worst < limit):
        out.append(f"quality: worst-sample fidelity {_g(worst)} < {_g(limit)}")
    limit = _num(constraints.get("max_perplexity_increase"))
    if limit is not None:
        inc = _num((report.get("budget") or {}).get("perplexity_increase"))
        if inc is None or inc > limit + 1e-12:
            out.append(f"quality: perplexity increase {_percent(inc)} > {_percent(limit)}")
    limit = _num(constraints.get("max_size_mb"))
    size = _num(output.get("size_bytes"))
    if limit is not None and (size is None or size / 1e6 > limit):
        out.append(f"size: {_g(None if size is None else size / 1e6)} MB > {_g(limit)} MB")
    limit = _num(constraints.get("max_latency_ms"))
    lat = latency_ms if latency_ms is not None else _num((output.get("latency_ms") or {}).get("median"))
    if limit is not None and (lat is None or lat > limit):
        out.append(f"latency: {_g(lat)} ms > {_g(limit)} ms")
    return out


def _g(v: float | None) -> str:
    """A measured number in a miss, for people (4 significant digits, never a raw float)."""
    return "not measured" if v is None else f"{v:.4g}"


def _points(drop: float | None) -> str:
    """An accuracy drop (a fraction) in points: 0.0504 -> '5.04 points'."""
    return "not measured" if drop is None else f"{drop * 100:.2f} points"


def _percent(rel: float | None) -> str:
    """A relative change in percent: 0.051 -> '+5.10 %'."""
    return "not measured" if rel is None else f"{rel * 100:+.2f} %"


def pareto(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Ids of the non-dominated points ``(id, cost, metric)``: lower cost and higher metric are better."""
    front: list[str] = []
    for pid, cost, metric in points:
        dominated = any(
            (c <= cost and m >= metric) and (c < cost or m > metric) for other, c, m in points if other != pid
        )
        if not dominated:
            front.append(pid)
    return front
