"""The report page's search section: the trials table and the scatter chart of a search job's report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from markupsafe import Markup

from api import charts
from models.objectives import OBJECTIVES
from models.report import Report
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
    latency_note: str = ""


def _mb(v: Any) -> float | None:
    return float(v) / 1e6 if is_num(v) else None


def search_view(report: dict[str, Any]) -> SearchView | None:
    """The search section of ``report`` (None when the job is not a search)."""
    typed = Report.read(report)
    section = typed.search
    if section is None:
        return None
    objective = section.objective
    best = section.best or {}
    rows, points = [], []
    for t in section.trials:
        winner = bool(best) and t.job_id == best.get("job_id")
        rows.append(TrialRow(
            index=t.index, label=t.label, state=t.state, job_id=t.job_id or "", metric_text=fmt_number(t.metric),
            size_text=fmt_number(_mb(t.size_bytes)), latency_text=fmt_number(t.latency),
            note=t.reason or "; ".join(t.misses), winner=winner, pareto=t.pareto,
        ))
        x = OBJECTIVES[objective].chart(t) if objective in OBJECTIVES else None
        points.append({"index": t.index, "label": f"#{t.index}", "x": x,
                       "y": t.metric, "met": t.met, "pareto": t.pareto, "winner": winner})
    input_metric = typed.input.metric_value if typed.input is not None else None
    max_drop: Any = section.constraints.get("max_accuracy_drop")
    floor = input_metric - max_drop if is_num(input_metric) and is_num(max_drop) else None
    metric_name = next((t.metric_name for t in section.trials if t.metric_name), "metric")
    chart = charts.search_scatter("search", f"trials: {objective} vs {metric_name}", points, objective,
                                  metric_name, input_metric, floor)
    total = section.total if section.total is not None else len(section.trials)
    counts = f"{section.done} done, {section.skipped} skipped of {total}"
    return SearchView(objective=objective, rows=rows, chart=chart, best=_best_text(best, section.closest, objective),
                      counts_text=counts, latency_note=latency_note(typed, best))


def _best_text(best: dict[str, Any], closest: dict[str, Any] | None, objective: str) -> str:
    """The winner, or (no trial beat the input) the closest trial and how far it got."""
    if best:
        return f"trial {best.get('trial')} ({best.get('label')})"
    if closest:
        return (f"none beat the input; closest: trial {closest.get('trial')} ({closest.get('label')}) at "
                f"{fmt_number(closest.get('objective_ratio'))}x the input's {objective}")
    return "none"


def latency_note(report: Report, best: dict[str, Any]) -> str:
    """Why the trials' latencies differ from the before/after table's: they were timed again together at the end;
    empty when no trial was."""
    trials = report.search.trials if report.search is not None else []
    if not any(t.latency_ms_remeasured is not None for t in trials):
        return ""
    note = ("The trials' latencies were timed again together at the end, interleaved in one process, so that they "
            "compare with each other; the before/after table is the winner's own job, which timed it against the "
            "input model in that job")
    won = next((t for t in trials if best and t.job_id == best.get("job_id")), None)
    table_ms = report.output.latency_median if report.output is not None else None
    if won is not None and won.latency_ms_remeasured is not None and is_num(table_ms):
        note += (f" (winner: {fmt_number(won.latency_ms_remeasured)} ms re-timed, "
                 f"{fmt_number(table_ms)} ms in its job)")
    return note + "."
