"""The search's trial space and its decisions (pure: no torch, no DB, no ORT).

``candidates`` derives the ``auto`` space from the task, the model and the data given, or takes an explicit
one, and attaches a cheap estimate to each trial (cost, expected size/latency ratio to the input, risk);
``skip_reason`` says whether a pending trial is worth starting given the trials that finished; ``meets``
judges a trial's report against the constraints; ``pareto`` keeps the non-dominated trials.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from models.formats import MODEL_FORMATS
from models.objectives import OBJECTIVES
from models.spec import CLASSIFICATION_TASKS, step_label

# A trial must be expected to beat the best so far on the objective by this fraction to be started.
MIN_GAIN = 0.02

# Per-step estimates: (cost in "quantize units", size ratio, latency ratio, risk of a metric loss).
_QUANTIZE: dict[str, tuple[float, float, float, float]] = {
    "fp16": (1.0, 0.5, 0.9, 0.05),
    "dynamic": (1.0, 0.27, 0.8, 0.2),
    "int8_weight": (1.0, 0.27, 0.9, 0.15),
    "int4": (1.2, 0.15, 0.8, 0.4),
    "static": (2.0, 0.27, 0.6, 0.35),
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

    def ratio(self, objective: str) -> float:
        """The estimated objective (size or latency) as a fraction of the input model's."""
        return float(getattr(self, OBJECTIVES[objective].estimate))


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


def estimate(steps: Sequence[Mapping[str, Any]]) -> Candidate:
    """A trial's estimate: costs add up, ratios multiply, risks add (recovery training subtracts)."""
    cost, size, lat, risk = 0.0, 1.0, 1.0, 0.0
    for step in steps:
        c, s, la, r = _step_estimate(step)
        cost, size, lat = cost + c, size * s, lat * la
        risk = max(0.0, risk + r)
    return Candidate([dict(s) for s in steps], cost, size, lat, risk, label=" + ".join(step_label(s) for s in steps))


def auto_space(task: str, model_format: str, meta: Mapping[str, Any], *, train: bool,
               calibration: bool) -> list[list[dict[str, Any]]]:
    """The ``auto`` candidates (3-8): post-training recipes without train data; prune ratios with recovery
    distillation and layer-dropped students with it; INT4 algorithms and block sizes for causal LMs."""
    if task == "text-generation":
        space: list[list[dict[str, Any]]] = [
            [{"type": "quantize", "mode": "int8_weight"}],
            [{"type": "quantize", "mode": "int4", "algorithm": "rtn", "block_size": 32}],
            [{"type": "quantize", "mode": "int4", "algorithm": "rtn", "block_size": 128}],
            [{"type": "quantize", "mode": "int4", "algorithm": "hqq", "block_size": 64}],
        ]
        if calibration:
            space.append([{"type": "quantize", "mode": "int4", "algorithm": "gptq", "block_size": 128}])
        return space
    space = [[{"type": "quantize", "mode": "fp16"}], [{"type": "quantize", "mode": "dynamic"}]]
    if calibration or train:
        space.append([{"type": "quantize", "mode": "static"}])
    if train:
        recover = {"type": "distill", "teacher": "input", "epochs": 2}
        for ratio in (0.25, 0.5):
            space.append([{"type": "prune", "ratio": ratio}, dict(recover), {"type": "quantize", "mode": "dynamic"}])
        layers = meta.get("layers")
        if MODEL_FORMATS[model_format].transformers and isinstance(layers, int) and layers >= 2:
            space.append([{"type": "distill", "teacher": "input", "epochs": 2, "student": {"layers": layers // 2}},
                          {"type": "quantize", "mode": "dynamic"}])
    return space


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


def skip_reason(cand: Candidate, objective: str, finished: Sequence[Outcome]) -> str | None:
    """Why a pending trial should not start (None: start it).

    * cannot beat the best: a trial that met the constraints already measured an objective ratio the
      candidate's estimate does not beat by ``MIN_GAIN``;
    * dominated: a trial at most as risky and expected at least as good on the objective already missed the
      accuracy/fidelity constraints, so this one would too.
    """
    met = [o.objective_ratio for o in finished if o.met and o.objective_ratio is not None]
    if met and cand.ratio(objective) >= min(met) * (1.0 - MIN_GAIN):
        return (f"cannot beat the best: estimated {objective} ratio {cand.ratio(objective):.2f} vs "
                f"{min(met):.2f} measured")
    for o in finished:
        if not o.met and o.risk <= cand.risk and any(r.startswith("quality") for r in o.reasons):
            return f"dominated: a less aggressive trial (risk {o.risk:.2f} <= {cand.risk:.2f}) missed the constraints"
    return None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def worst_fidelity(report: Mapping[str, Any], task: str) -> float | None:
    """The fidelity ``min_fidelity`` is judged on: top-1 agreement for classifiers, else the lowest per-sample
    cosine similarity to the input model's outputs."""
    fid = report.get("fidelity") or (report.get("output") or {}).get("fidelity") or {}
    if task in CLASSIFICATION_TASKS and _num(fid.get("top1_agreement")) is not None:
        return _num(fid.get("top1_agreement"))
    return _num(fid.get("min_cosine"))


def meets(constraints: Mapping[str, Any], report: Mapping[str, Any], task: str,
          latency_ms: float | None = None) -> list[str]:
    """The constraints a trial's report misses (empty: it meets them all). Accuracy, fidelity and
    perplexity misses start with ``quality``; ``latency_ms`` overrides the report's (re-measured)."""
    out: list[str] = []
    output = report.get("output") or {}
    drop = _num((report.get("budget") or {}).get("accuracy_drop"))
    limit = _num(constraints.get("max_accuracy_drop"))
    if limit is not None and (drop is None or drop > limit + 1e-12):
        out.append(f"quality: accuracy drop {_points(drop)} > {_points(limit)}")
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
