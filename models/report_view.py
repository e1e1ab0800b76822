"""What a person reads of a job report, as plain rows: one pure function shared by the HTML report and the CLI.

Nothing here escapes HTML or knows about a terminal: templates autoescape, the CLI prints text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


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


def fmt_ratio(before: Any, after: Any) -> str:
    """before / after as '3.20×'; '-' when either is missing or after is zero."""
    if is_num(before) and is_num(after) and float(after) != 0:
        return f"{float(before) / float(after):.2f}×"
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
            delta = float(acc_a) - float(acc_b)
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
