"""What the HTML pages show: the owner's jobs read through the job services, shaped as plain data for templates.

Rows come from ``models.report_view`` (shared with the CLI); charts from ``api.charts``. Nothing here
writes HTML: the templates autoescape every value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from markupsafe import Markup
from sqlalchemy.orm import Session

from api import charts
from api.services import jobs as job_service
from api.services.search_page import SearchView, search_view
from models import report_view as rv
from models.multitask_view import MergeView, TaskRow, baselines_text, merge_view, size_text, task_rows
from models.report import Evaluation, Report
from models.schemas import ArtifactOut, JobError, JobOut
from models.spec import step_label
from models.tables import STATUSES, SUCCEEDED, TERMINAL

REFRESH_S = 5
DASHBOARD_FILTERS = tuple(s for s in STATUSES if s != "cancelling")
_MB = 1024**2


@dataclass(frozen=True)
class ArtifactLink:
    """A download link of one artifact."""

    id: str
    name: str
    kind: str
    url: str
    size_text: str
    sha256: str


@dataclass(frozen=True)
class ReportPage:
    """Everything ``report.html`` shows of one job."""

    id: str
    status: str
    phase: str
    model: str
    task: str
    created: str
    finished: str
    pipeline: list[str]
    error: JobError | None
    comparison: list[rv.ComparisonRow]
    gains: list[rv.Gain]
    warnings: list[str]
    notes: list[str]
    quality: list[rv.QualityRow]
    charts: list[Markup]
    curves: list[tuple[str, list[Markup]]]
    steps: list[rv.StepRow]
    step_chart: Markup
    generations: list[rv.GenerationRow]
    artifacts: list[ArtifactLink]
    running: bool
    refresh: int | None
    search: SearchView | None = None
    tasks: list[TaskRow] = field(default_factory=list)
    tasks_size: str = ""
    tasks_baselines: str = ""  # the single-task baselines and their models' size, when the step asked for them
    merge: MergeView | None = None


@dataclass(frozen=True)
class DashboardRow:
    """One job line of the dashboard."""

    id: str
    name: str
    status: str
    phase: str
    pipeline: list[str]
    error: str
    percent: float
    progress_text: str
    created: str
    artifacts: list[ArtifactLink]
    warnings: list[str]


@dataclass(frozen=True)
class Dashboard:
    """Everything ``dashboard.html`` shows."""

    rows: list[DashboardRow]
    status: str | None
    filters: tuple[str, ...] = DASHBOARD_FILTERS
    refresh: int = REFRESH_S


def when(ts: datetime | None) -> str:
    """A timestamp for people (seconds, no zone); '-' when missing."""
    return ts.strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _spec(job: JobOut) -> dict[str, Any]:
    return job.spec.model_dump(mode="json", warnings=False)


def _report(job: JobOut) -> dict[str, Any]:
    report = job.result.report if job.result else None
    return report if isinstance(report, dict) else {}


def _warning_lines(job: JobOut) -> list[str]:
    if job.result and job.result.warnings:
        return rv.warning_lines({"warnings": job.result.warnings})
    return rv.warning_lines(_report(job))


def _notes(report: Report) -> list[str]:
    """What a person should know about how the figures were made: where calibration rows came from when they
    were carved from the eval set."""
    split = report.calibration_split or {}
    return [str(split["message"])] if split.get("message") else []


def _links(artifacts: list[ArtifactOut]) -> list[ArtifactLink]:
    return [
        ArtifactLink(a.id, a.name, a.kind, a.url or f"/v1/artifacts/{a.id}/content", rv.fmt_bytes(a.size_bytes), a.sha256)
        for a in artifacts
    ]


def _two_decimals(v: Any) -> str:
    return f"{float(v):.2f}"


def _mb(n: Any) -> float | None:
    return float(n) / _MB if rv.is_num(n) else None


def before_after_charts(report: dict[str, Any]) -> list[Markup]:
    """The before/after bar charts of a report: size, latency, parameters, MACs, accuracy (those it has)."""
    typed = Report.read(report)
    b, a = typed.input or Evaluation(), typed.output or Evaluation()
    made = [
        charts.before_after("size", "size (MB)", _mb(b.size_bytes), _mb(a.size_bytes), " MB", _two_decimals),
        charts.before_after("latency", f"{rv.latency_title(report)} median (ms)", b.latency_median,
                            a.latency_median, " ms"),
        charts.before_after("params", "parameters", b.params, a.params),
        charts.before_after("macs", "MACs", b.macs, a.macs),
        charts.before_after("accuracy", "accuracy", b.accuracy, a.accuracy),
    ]
    if rv.is_lm_report(report):  # causal LMs: perplexity and decode speed
        tps = [side.decode.tokens_per_s if side.decode is not None else None for side in (b, a)]
        made += [charts.before_after("perplexity", "perplexity", b.perplexity, a.perplexity),
                 charts.before_after("decode", "decode tokens/s", tps[0], tps[1])]
    return [c for c in made if c]


def curve_charts(steps: list[rv.StepRow]) -> list[tuple[str, list[Markup]]]:
    """Per step with a training curve: its label and one line chart per series."""
    out = []
    for step in steps:
        made = [
            charts.curve(f"curve-{step.index}-{key}", key.replace("_", " "), points,
                         charts.SERIES_COLOURS[i % len(charts.SERIES_COLOURS)])
            for i, (key, points) in enumerate(step.curves.items())
        ]
        made = [c for c in made if c]
        if made:
            out.append((step.label, made))
    return out


def report_page(session: Session, owner: str, job_id: str) -> ReportPage:
    """One job's report page data; 404 problem when the owner has no such job."""
    job = job_service.job_out(session, job_service.get_job(session, owner, job_id))
    spec, report = _spec(job), _report(job)
    steps = rv.step_rows(report)
    typed = Report.read(report)
    has_sides = bool(typed.input or typed.output)
    running = job.status not in TERMINAL
    return ReportPage(
        id=job.id, status=job.status, phase=job.phase, model=str(spec.get("model") or ""),
        task=str(typed.task or spec.get("task") or ""),
        created=when(job.timestamps.created_at), finished=when(job.timestamps.finished_at),
        pipeline=rv.pipeline_labels(report, spec), error=job.error,
        comparison=rv.comparison_rows(report) if has_sides else [],
        gains=rv.gains(report), warnings=_warning_lines(job), notes=_notes(typed), quality=rv.quality_rows(report),
        charts=before_after_charts(report) if has_sides else [],
        curves=curve_charts(steps), steps=steps,
        step_chart=charts.step_times("wall time per step (s)", [(s.label, s.wall_s) for s in steps]),
        generations=rv.generation_rows(report),
        artifacts=_links(job.result.artifacts if job.result else []),
        running=running, refresh=REFRESH_S if running else None, search=search_view(report),
        tasks=task_rows(report), tasks_size=size_text(report), merge=merge_view(report),
        tasks_baselines=baselines_text(report),
    )


def _dashboard_row(job: JobOut) -> DashboardRow:
    p = job.progress
    percent = 100.0 if job.status == SUCCEEDED else min(max(float(p.percent or 0.0), 0.0), 100.0)
    text = rv.progress_text(job.status, p.step, p.steps, percent, p.epoch, p.epochs,
                            job.error.step if job.error else None)
    error = f"{job.error.code}: {job.error.message[:160]}" if job.error else ""
    spec = _spec(job)
    pipeline = [step_label(s) for s in spec.get("steps") or [] if isinstance(s, dict)]
    search = spec.get("search")
    if isinstance(search, dict):  # its trials are not listed: the search stands for them
        pipeline = [f"search for {search.get('objective', 'latency')}"]
    return DashboardRow(
        id=job.id, name=job.name or "", status=job.status, phase=job.phase, pipeline=pipeline, error=error,
        percent=percent,
        progress_text=text, created=when(job.timestamps.created_at),
        artifacts=_links(job.result.artifacts if job.result else []), warnings=_warning_lines(job),
    )


def dashboard(session: Session, owner: str, status: str | None, limit: int) -> Dashboard:
    """The owner's newest jobs (optionally of one status) for the dashboard; an unknown status lists none."""
    if status and status not in STATUSES:
        return Dashboard(rows=[], status=status)
    page = job_service.list_jobs(session, owner, status or None, None, limit, top_level=True)
    return Dashboard(rows=[_dashboard_row(j) for j in page.data], status=status or None)
