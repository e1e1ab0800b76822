"""The report page's search section: the trials table and the scatter chart of a search job's report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from markupsafe import Markup

from api import charts
from models.report_view import fmt_number, is_num


@dataclass(frozen=True)
class TrialRow:
    """One line of the trials table."""

    index: int
    label: str
    state: str
    job_id: str
    metric_text: str
    size_text: str
    latency_text: str
    note: str
    winner: bool
    pareto: bool


@dataclass(frozen=True)
class SearchView:
    objective: str
    rows: list[TrialRow]
    chart: Markup
    best: str
    counts_text: str


def _mb(v: Any) -> float | None:
    return float(v) / 1e6 if is_num(v) else None


def search_view(report: dict[str, Any]) -> SearchView | None:
    """The search section of ``report`` (None when the job is not a search)."""
    section = report.get("search")
    if not isinstance(section, dict):
        return None
    objective = str(section.get("objective", "latency"))
    best = section.get("best") or {}
    trials = [t for t in section.get("trials") or [] if isinstance(t, dict)]
    rows, points = [], []
    for t in trials:
        latency = t.get("latency_ms_remeasured") if is_num(t.get("latency_ms_remeasured")) else t.get("latency_ms")
        winner = bool(best) and t.get("job_id") == best.get("job_id")
        misses = "; ".join(t.get("misses") or [])
        rows.append(TrialRow(
            index=int(t.get("index", 0)), label=str(t.get("label", "")), state=str(t.get("state", "")),
            job_id=str(t.get("job_id") or ""), metric_text=fmt_number(t.get("metric")),
            size_text=fmt_number(_mb(t.get("size_bytes"))), latency_text=fmt_number(latency),
            note=str(t.get("reason") or misses), winner=winner, pareto=bool(t.get("pareto")),
        ))
        x = latency if objective == "latency" else _mb(t.get("size_bytes"))
        points.append({"index": int(t.get("index", 0)), "label": f"#{t.get('index', '')}", "x": x,
                       "y": t.get("metric"), "met": t.get("met"), "pareto": t.get("pareto"), "winner": winner})
    input_metric: Any = ((report.get("input") or {}).get("metric") or {}).get("value")
    max_drop: Any = (section.get("constraints") or {}).get("max_accuracy_drop")
    floor = input_metric - max_drop if is_num(input_metric) and is_num(max_drop) else None
    metric_name = next((str(t["metric_name"]) for t in trials if t.get("metric_name")), "metric")
    chart = charts.search_scatter("search", f"trials: {objective} vs {metric_name}", points, objective,
                                  metric_name, input_metric, floor)
    counts = f"{section.get('done', 0)} done, {section.get('skipped', 0)} skipped of {section.get('total', len(trials))}"
    return SearchView(objective=objective, rows=rows, chart=chart, best=_best_text(best, section.get("closest"),
                                                                                  objective), counts_text=counts)


def _best_text(best: dict[str, Any], closest: Any, objective: str) -> str:
    """The winner, or (no trial beat the input) the closest trial and how far it got."""
    if best:
        return f"trial {best.get('trial')} ({best.get('label')})"
    if isinstance(closest, dict) and closest:
        return (f"none beat the input; closest: trial {closest.get('trial')} ({closest.get('label')}) at "
                f"{fmt_number(closest.get('objective_ratio'))}x the input's {objective}")
    return "none"
