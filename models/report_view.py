"""What a person reads of a job report, as plain rows: one pure function shared by the HTML report and the CLI.

Nothing here escapes HTML or knows about a terminal: templates autoescape, the CLI prints text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast


def is_num(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


def fmt_number(v: Any, digits: int = 4) -> str:
    """A number for people (thousands separators, significant digits); '-' when missing."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 1e6:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def fmt_bytes(n: Any) -> str:
    """Bytes as B/KB/MB/GB; '-' when missing."""
    if not is_num(n):
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} GB"


def latency_median(side: dict[str, Any]) -> Any:
    """The median latency (ms) of one side of a report (older reports store a bare number)."""
    lat = side.get("latency_ms")
    return lat.get("median") if isinstance(lat, dict) else lat


TIMES = "\u00d7"  # the multiplication sign of '3.20x'


def fmt_ratio(before: Any, after: Any) -> str:
    """before / after as '3.20' and the multiplication sign; '-' when either is missing or after is zero."""
    if is_num(before) and is_num(after) and float(after) != 0:
        return f"{float(before) / float(after):.2f}{TIMES}"
    return "-"


@dataclass(frozen=True)
class ComparisonRow:
    """One line of the before/after table: raw values, their text, and the change (ratio or delta)."""

    key: str
    label: str
    before: Any
    after: Any
    before_text: str
    after_text: str
    change_text: str
    # True when the change is an improvement, False when it is a regression, None when unknown.
    better: bool | None = None


def _ratio_row(key: str, label: str, before: Any, after: Any, text: Any = fmt_number) -> ComparisonRow:
    better = None
    if is_num(before) and is_num(after):
        better = float(after) <= float(before)
    return ComparisonRow(key, label, before, after, text(before), text(after), fmt_ratio(before, after), better)


def comparison_rows(report: dict[str, Any]) -> list[ComparisonRow]:
    """The before/after rows of a report: size, latency (median, p90, mean), parameters, MACs, accuracy."""
    b = report.get("input") or {}
    a = report.get("output") or {}
    rows = [
        _ratio_row("size_bytes", "size", b.get("size_bytes"), a.get("size_bytes"), fmt_bytes),
        _ratio_row("latency_ms", "latency median (ms)", latency_median(b), latency_median(a)),
    ]
    lb, la = b.get("latency_ms"), a.get("latency_ms")
    if isinstance(lb, dict) or isinstance(la, dict):
        lb, la = lb if isinstance(lb, dict) else {}, la if isinstance(la, dict) else {}
        for key in ("p90", "mean"):
            if key in lb or key in la:
                rows.append(_ratio_row(f"latency_{key}", f"latency {key} (ms)", lb.get(key), la.get(key)))
    rows.append(_ratio_row("params", "parameters", b.get("params"), a.get("params")))
    if b.get("macs") is not None or a.get("macs") is not None:
        rows.append(_ratio_row("macs", "MACs", b.get("macs"), a.get("macs")))
    acc_b, acc_a = b.get("accuracy"), a.get("accuracy")
    if acc_b is not None or acc_a is not None:
        change, better = "-", None
        if is_num(acc_b) and is_num(acc_a):
            delta = float(cast(float, acc_a)) - float(cast(float, acc_b))
            change, better = f"{delta:+.4f}", delta >= 0
        label = f"accuracy ({report.get('task') or 'task'})"
        rows.append(ComparisonRow("accuracy", label, acc_b, acc_a, fmt_number(acc_b), fmt_number(acc_a), change, better))
    return rows


@dataclass(frozen=True)
class QualityRow:
    """A single-valued line: the accuracy budget or one fidelity measure."""

    label: str
    value_text: str
    better: bool | None = None


FIDELITY_LABELS = (("max_abs_err", "max abs error"), ("cosine", "cosine similarity"), ("top1_agreement", "top-1 agreement"))


def quality_rows(report: dict[str, Any]) -> list[QualityRow]:
    """The accuracy budget (met or missed) and the fidelity measures of a report."""
    rows = []
    budget = report.get("budget") or {}
    if isinstance(budget, dict) and budget:
        met = budget.get("met")
        text = "met" if met else ("missed" if met is not None else "-")
        label = f"accuracy budget (max drop {fmt_number(budget.get('max_accuracy_drop'))})"
        rows.append(QualityRow(label, text, None if met is None else bool(met)))
    fidelity = report.get("fidelity") or {}
    if isinstance(fidelity, dict):
        for key, label in FIDELITY_LABELS:
            if key in fidelity:
                rows.append(QualityRow(f"fidelity: {label}", fmt_number(fidelity.get(key), 6)))
    return rows


def step_label(step: dict[str, Any]) -> str:
    """A spec step in a few words: 'prune structured 0.5', 'quantize dynamic', 'distill 3 ep'."""
    kind = str(step.get("type", "?"))
    if kind == "prune":
        return f"prune {step.get('method', 'structured')} {fmt_number(step.get('ratio'))}"
    if kind == "quantize":
        return f"quantize {step.get('mode', 'dynamic')}"
    if kind in ("finetune", "distill") and step.get("epochs"):
        return f"{kind} {step.get('epochs')} ep"
    return kind


def pipeline_labels(report: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """The steps a job ran, as the report names them (else as the spec describes them)."""
    labels = report.get("pipeline")
    if isinstance(labels, list) and labels:
        return [str(label) for label in labels]
    return [step_label(s) for s in spec.get("steps") or [] if isinstance(s, dict)]


@dataclass(frozen=True)
class Gain:
    """One headline gain: a ratio and its word ('smaller'), or the accuracy delta."""

    value_text: str
    word: str
    better: bool | None = None


GAIN_WORDS = (("size_ratio", "smaller"), ("latency_ratio", "faster"), ("params_ratio", "fewer parameters"))


def gains(report: dict[str, Any]) -> list[Gain]:
    """The report's headline gains (size, latency, parameter ratios; accuracy delta)."""
    found = report.get("gains") or {}
    if not isinstance(found, dict):
        return []
    out = [Gain(f"{float(found[key]):.2f}{TIMES}", word) for key, word in GAIN_WORDS if is_num(found.get(key))]
    if is_num(found.get("accuracy_delta")):
        delta = float(found["accuracy_delta"])
        out.append(Gain(f"{delta:+.4f}", "accuracy", delta >= 0))
    return out


CURVE_SERIES = ("loss", "eval_metric", "lr")


@dataclass(frozen=True)
class StepRow:
    """One executed step: its label, wall time, scalar metrics, and its training curve (epoch, value) per series."""

    index: Any
    label: str
    wall_s: Any
    index_text: str
    wall_text: str
    metrics_text: str
    curves: dict[str, list[tuple[Any, Any]]]


def step_rows(report: dict[str, Any]) -> list[StepRow]:
    """The report's steps in order, with the series (loss, eval_metric, lr) their curves hold."""
    rows = []
    for step in report.get("steps") or []:
        if not isinstance(step, dict):
            continue
        label = str(step.get("label") or step.get("type") or f"step {step.get('index')}")
        metrics = step.get("metrics") or {}
        shown = " ".join(
            f"{k}={fmt_number(v)}" for k, v in metrics.items() if not isinstance(v, dict | list)
        ) if isinstance(metrics, dict) else ""
        points = [c for c in step.get("curve") or [] if isinstance(c, dict)]
        curves = {
            key: [(c.get("epoch"), c.get(key)) for c in points]
            for key in CURVE_SERIES if any(is_num(c.get(key)) for c in points)
        }
        rows.append(StepRow(step.get("index"), label, step.get("wall_s"), fmt_number(step.get("index")),
                            fmt_number(step.get("wall_s"), 3), shown, curves))
    return rows
