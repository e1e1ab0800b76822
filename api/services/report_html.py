"""Self-contained HTML for job reports and the dashboard: inline CSS, server-drawn SVG, no external requests.

Every value that comes from a user or a job (names, ids, phases, messages, metric keys) goes through
``html.escape``; numbers are formatted here. Rendering functions take plain data (``JobView``) so
they are testable without a database; ``load_job``/``list_jobs`` read the rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from typing import Any

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
BEFORE, AFTER = "#8a94a6", "#2f6fde"
SERIES_COLOURS = ("#2f6fde", "#e0702b", "#2a9d6f", "#b5407a")

CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px}
header .sub{color:#b9c0cc;font-size:13px;margin-top:4px}
main{max-width:1100px;margin:0 auto;padding:18px 24px}
section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:14px 18px;margin-bottom:16px}
h2{font-size:16px;margin:0 0 10px}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{padding:6px 8px;border-bottom:1px solid #eceef2;text-align:left}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;font-size:12px;font-weight:600;color:#fff}
.s-queued{background:#8a94a6}.s-running{background:#2f6fde}.s-cancelling{background:#d49b1b}
.s-succeeded{background:#2a9d6f}.s-failed{background:#c8413b}.s-cancelled{background:#6b7280}
.pipeline{display:flex;flex-wrap:wrap;gap:6px;align-items:center}
.pipeline .step{background:#eef3fd;border:1px solid #c9d8f6;border-radius:6px;padding:4px 10px;font-size:13px}
.pipeline .arrow{color:#8a94a6}
.bar{background:#eceef2;border-radius:4px;height:10px;width:160px;overflow:hidden}
.bar>span{display:block;height:100%;background:#2f6fde}
.good{color:#2a9d6f;font-weight:600}.bad{color:#c8413b;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:16px}
.muted{color:#6b7280;font-size:13px}
.error{background:#fdecea;border-color:#f3b8b4}
a{color:#2f6fde}
svg text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
"""


@dataclass
class ArtifactView:
    id: str
    name: str
    kind: str
    size_bytes: int
    sha256: str


@dataclass
class JobView:
    """What a page needs of a job (read from ``models.tables.Job`` or built by tests)."""

    id: str
    status: str
    phase: str
    progress: dict[str, Any]
    spec: dict[str, Any]
    created_at: datetime | None = None
    finished_at: datetime | None = None
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    artifacts: list[ArtifactView] = field(default_factory=list)

    @property
    def report(self) -> dict[str, Any]:
        report = (self.result or {}).get("report")
        return report if isinstance(report, dict) else {}


# -- data access ------------------------------------------------------------------------------


def _view(job: Any, artifacts: list[Any]) -> JobView:
    return JobView(
        id=job.id, status=job.status, phase=job.phase or "", progress=dict(job.progress or {}),
        spec=dict(job.spec or {}), created_at=job.created_at, finished_at=job.finished_at,
        error=job.error, result=job.result,
        artifacts=[ArtifactView(a.id, a.name, a.kind, int(a.size_bytes), a.sha256) for a in artifacts],
    )


def _owner() -> str:
    from models.settings import get_settings

    return get_settings().owner


def load_job(job_id: str) -> JobView | None:
    """The job and its artifacts, or None when the local owner has no such job."""
    from sqlalchemy import select

    from models.db import session_scope
    from models.tables import Artifact, Job

    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None or job.owner != _owner():
            return None
        arts = s.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)).all()
        return _view(job, list(arts))


def list_jobs(status: str | None = None, limit: int = 100) -> list[JobView]:
    """The newest jobs (optionally of one status) with their artifacts."""
    from sqlalchemy import select

    from models.db import session_scope
    from models.tables import Artifact, Job

    with session_scope() as s:
        q = select(Job).where(Job.owner == _owner()).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
        if status:
            q = q.where(Job.status == status)
        jobs = list(s.scalars(q).all())
        by_job: dict[str, list[Any]] = {j.id: [] for j in jobs}
        if jobs:
            for a in s.scalars(select(Artifact).where(Artifact.job_id.in_(list(by_job))).order_by(Artifact.name)):
                by_job[a.job_id].append(a)
        return [_view(j, by_job[j.id]) for j in jobs]


# -- formatting -------------------------------------------------------------------------------


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


def fmt(v: Any, digits: int = 4) -> str:
    """A number for people (thousands separators, significant digits); '-' when missing."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return escape(str(v))
        if abs(v) >= 1e6:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return escape(str(v))


def fmt_bytes(n: Any) -> str:
    """Bytes as B/KB/MB/GB."""
    if not _is_num(n):
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} GB"


def _when(ts: datetime | None) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _latency(side: dict[str, Any]) -> Any:
    lat = side.get("latency_ms")
    return lat.get("median") if isinstance(lat, dict) else lat


def _page(title: str, body: str, refresh: int | None = None) -> str:
    meta = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"{meta}<title>{escape(title)}</title><style>{CSS}</style></head><body>{body}</body></html>"
    )


def _badge(status: str) -> str:
    return f'<span class="badge s-{escape(status)}">{escape(status)}</span>'


def _step_label(step: dict[str, Any]) -> str:
    kind = str(step.get("type", "?"))
    if kind == "prune":
        return f"prune {step.get('method', 'structured')} {fmt(step.get('ratio'))}"
    if kind == "quantize":
        return f"quantize {step.get('mode', 'dynamic')}"
    if kind in ("finetune", "distill") and step.get("epochs"):
        return f"{kind} {step.get('epochs')} ep"
    return kind


# -- SVG charts -------------------------------------------------------------------------------


def svg_before_after(title: str, before: Any, after: Any, unit: str = "", fmt_value: Any = fmt) -> str:
    """Two horizontal bars (before, after) scaled to the larger of the two."""
    if not (_is_num(before) or _is_num(after)):
        return ""
    w, label_w, bar_h, pad = 320, 60, 22, 8
    vals = [float(before) if _is_num(before) else 0.0, float(after) if _is_num(after) else 0.0]
    top = max(max(vals), 1e-12)
    span = w - label_w - 90
    rows = []
    for i, (name, value, colour) in enumerate((("before", vals[0], BEFORE), ("after", vals[1], AFTER))):
        y = 28 + i * (bar_h + pad)
        width = max(1.0, span * value / top) if value > 0 else 0.0
        raw = before if i == 0 else after
        shown = fmt_value(raw) if _is_num(raw) else "-"
        rows.append(
            f'<text x="0" y="{y + 15}" font-size="12" fill="#1d2330">{name}</text>'
            f'<rect class="bar {name}" x="{label_w}" y="{y}" width="{width:.1f}" height="{bar_h}" rx="3" fill="{colour}">'
            f"<title>{name}: {shown}{escape(unit)}</title></rect>"
            f'<text x="{label_w + width + 6:.1f}" y="{y + 15}" font-size="12" fill="#1d2330">{shown}{escape(unit)}</text>'
        )
    h = 28 + 2 * (bar_h + pad)
    return (
        f'<svg class="chart before-after" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" role="img" aria-label="{escape(title)}">'
        f'<text x="0" y="14" font-size="13" font-weight="600" fill="#1d2330">{escape(title)}</text>'
        + "".join(rows) + "</svg>"
    )


def svg_line(title: str, points: list[tuple[Any, Any]], colour: str = SERIES_COLOURS[0]) -> str:
    """A line chart (x = epoch) with min/max labels, drawn as an SVG polyline with point markers."""
    pts = [(float(x), float(y)) for x, y in points if _is_num(x) and _is_num(y)]
    if not pts:
        return ""
    w, h, left, right, top, bottom = 320, 180, 48, 12, 26, 28
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0) * 0.1 - 1e-9, y1 + abs(y1) * 0.1 + 1e-9

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom)

    coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    markers = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in pts)
    axis = (
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="#c5cad3"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="#c5cad3"/>'
        f'<text x="{left - 4}" y="{top + 4}" font-size="11" text-anchor="end" fill="#6b7280">{fmt(max(ys), 3)}</text>'
        f'<text x="{left - 4}" y="{h - bottom}" font-size="11" text-anchor="end" fill="#6b7280">{fmt(min(ys), 3)}</text>'
        f'<text x="{left}" y="{h - 10}" font-size="11" fill="#6b7280">epoch {fmt(min(xs), 3)}</text>'
        f'<text x="{w - right}" y="{h - 10}" font-size="11" text-anchor="end" fill="#6b7280">{fmt(max(xs), 3)}</text>'
    )
    return (
        f'<svg class="chart curve" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" role="img" aria-label="{escape(title)}">'
        f'<text x="0" y="14" font-size="13" font-weight="600" fill="#1d2330">{escape(title)}</text>{axis}'
        f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>{markers}</svg>'
    )


def svg_hbars(title: str, values: list[tuple[str, Any]], unit: str = "") -> str:
    """Horizontal bars, one per labelled value (each step's wall time)."""
    items = [(label, float(v)) for label, v in values if _is_num(v)]
    if not items:
        return ""
    w, label_w, bar_h, pad = 520, 170, 20, 6
    top = max(max(v for _, v in items), 1e-12)
    span = w - label_w - 80
    rows = []
    for i, (label, value) in enumerate(items):
        y = 26 + i * (bar_h + pad)
        width = max(1.0, span * value / top) if value > 0 else 0.0
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        rows.append(
            f'<text x="0" y="{y + 14}" font-size="12" fill="#1d2330">{escape(label[:28])}</text>'
            f'<rect class="bar" x="{label_w}" y="{y}" width="{width:.1f}" height="{bar_h}" rx="3" fill="{colour}">'
            f"<title>{escape(label)}: {fmt(value)}{escape(unit)}</title></rect>"
            f'<text x="{label_w + width + 6:.1f}" y="{y + 14}" font-size="12" fill="#1d2330">{fmt(value, 3)}{escape(unit)}</text>'
        )
    h = 26 + len(items) * (bar_h + pad)
    return (
        f'<svg class="chart hbars" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" role="img" aria-label="{escape(title)}">'
        f'<text x="0" y="14" font-size="13" font-weight="600" fill="#1d2330">{escape(title)}</text>'
        + "".join(rows) + "</svg>"
    )


# -- the report page --------------------------------------------------------------------------


def _ratio(before: Any, after: Any) -> str:
    if _is_num(before) and _is_num(after) and float(after) != 0:
        return f"{float(before) / float(after):.2f}&times;"
    return "-"


def _comparison_table(report: dict[str, Any]) -> str:
    b, a = report.get("input") or {}, report.get("output") or {}
    rows = [
        ("size", fmt_bytes(b.get("size_bytes")), fmt_bytes(a.get("size_bytes")), _ratio(b.get("size_bytes"), a.get("size_bytes"))),
        ("latency median (ms)", fmt(_latency(b)), fmt(_latency(a)), _ratio(_latency(b), _latency(a))),
    ]
    lb, la = b.get("latency_ms"), a.get("latency_ms")
    if isinstance(lb, dict) or isinstance(la, dict):
        lb, la = lb if isinstance(lb, dict) else {}, la if isinstance(la, dict) else {}
        for key in ("p90", "mean"):
            if key in lb or key in la:
                rows.append((f"latency {key} (ms)", fmt(lb.get(key)), fmt(la.get(key)), _ratio(lb.get(key), la.get(key))))
    rows.append(("parameters", fmt(b.get("params")), fmt(a.get("params")), _ratio(b.get("params"), a.get("params"))))
    if b.get("macs") is not None or a.get("macs") is not None:
        rows.append(("MACs", fmt(b.get("macs")), fmt(a.get("macs")), _ratio(b.get("macs"), a.get("macs"))))
    metric = "accuracy"
    if b.get(metric) is not None or a.get(metric) is not None:
        delta = "-"
        if _is_num(b.get(metric)) and _is_num(a.get(metric)):
            d = float(a[metric]) - float(b[metric])
            delta = f'<span class="{"good" if d >= 0 else "bad"}">{d:+.4f}</span>'
        rows.append((f"{metric} ({escape(str(report.get('task') or 'task'))})", fmt(b.get(metric)), fmt(a.get(metric)), delta))
    body = "".join(
        f'<tr><td>{label}</td><td class="num">{x}</td><td class="num">{y}</td><td class="num">{r}</td></tr>'
        for label, x, y, r in rows
    )
    return (
        '<table class="compare"><thead><tr><th></th><th class="num">before</th><th class="num">after</th>'
        f'<th class="num">before / after</th></tr></thead><tbody>{body}</tbody></table>'
    )


def _gains(report: dict[str, Any]) -> str:
    gains = report.get("gains") or {}
    if not isinstance(gains, dict) or not gains:
        return ""
    names = {"size_ratio": "smaller", "latency_ratio": "faster", "params_ratio": "fewer parameters"}
    parts = []
    for key, word in names.items():
        if _is_num(gains.get(key)):
            parts.append(f"<strong>{float(gains[key]):.2f}&times;</strong> {word}")
    if _is_num(gains.get("accuracy_delta")):
        d = float(gains["accuracy_delta"])
        parts.append(f'accuracy <span class="{"good" if d >= 0 else "bad"}">{d:+.4f}</span>')
    return f'<p class="gains">{" &middot; ".join(parts)}</p>' if parts else ""


def _budget_and_fidelity(report: dict[str, Any]) -> str:
    out = []
    budget = report.get("budget") or {}
    if isinstance(budget, dict) and budget:
        met = budget.get("met")
        state = '<span class="good">met</span>' if met else ('<span class="bad">missed</span>' if met is not None else "-")
        out.append(f'<tr><td>accuracy budget (max drop {fmt(budget.get("max_accuracy_drop"))})</td><td class="num">{state}</td></tr>')
    fidelity = report.get("fidelity") or {}
    if isinstance(fidelity, dict):
        for key, label in (("max_abs_err", "max abs error"), ("cosine", "cosine similarity"),
                           ("top1_agreement", "top-1 agreement")):
            if key in fidelity:
                out.append(f'<tr><td>fidelity: {label}</td><td class="num">{fmt(fidelity.get(key), 6)}</td></tr>')
    if not out:
        return ""
    return f'<section id="quality"><h2>Budget and fidelity</h2><table>{"".join(out)}</table></section>'


def _charts(report: dict[str, Any]) -> str:
    b, a = report.get("input") or {}, report.get("output") or {}
    charts = [
        svg_before_after("size (MB)", _mb(b.get("size_bytes")), _mb(a.get("size_bytes")), " MB"),
        svg_before_after("latency median (ms)", _latency(b), _latency(a), " ms"),
        svg_before_after("parameters", b.get("params"), a.get("params")),
        svg_before_after("MACs", b.get("macs"), a.get("macs")),
        svg_before_after("accuracy", b.get("accuracy"), a.get("accuracy")),
    ]
    charts = [c for c in charts if c]
    if not charts:
        return ""
    return f'<section id="charts"><h2>Before and after</h2><div class="charts">{"".join(charts)}</div></section>'


def _mb(n: Any) -> float | None:
    return float(n) / 1024**2 if _is_num(n) else None


def _curves(report: dict[str, Any]) -> str:
    blocks = []
    for step in report.get("steps") or []:
        if not isinstance(step, dict):
            continue
        curve = [c for c in step.get("curve") or [] if isinstance(c, dict)]
        if not curve:
            continue
        charts = []
        series = [k for k in ("loss", "eval_metric", "lr") if any(_is_num(c.get(k)) for c in curve)]
        for i, key in enumerate(series):
            pts = [(c.get("epoch"), c.get(key)) for c in curve]
            charts.append(svg_line(key.replace("_", " "), pts, SERIES_COLOURS[i % len(SERIES_COLOURS)]))
        label = escape(str(step.get("label") or step.get("type") or f"step {step.get('index')}"))
        blocks.append(f'<h3>{label}</h3><div class="charts">{"".join(c for c in charts if c)}</div>')
    if not blocks:
        return ""
    return f'<section id="curves"><h2>Training curves</h2>{"".join(blocks)}</section>'


def _step_times(report: dict[str, Any]) -> str:
    rows, items = [], []
    for step in report.get("steps") or []:
        if not isinstance(step, dict):
            continue
        label = str(step.get("label") or step.get("type") or f"step {step.get('index')}")
        items.append((label, step.get("wall_s")))
        metrics = step.get("metrics") or {}
        shown = " ".join(
            f"{escape(str(k))}={fmt(v)}" for k, v in metrics.items() if not isinstance(v, dict | list)
        ) if isinstance(metrics, dict) else ""
        rows.append(
            f'<tr><td>{fmt(step.get("index"))}</td><td>{escape(label)}</td>'
            f'<td class="num">{fmt(step.get("wall_s"), 3)}</td><td>{shown}</td></tr>'
        )
    if not rows:
        return ""
    chart = svg_hbars("wall time per step (s)", items, " s")
    return (
        f'<section id="steps"><h2>Steps</h2>{chart}<table><thead><tr><th>#</th><th>step</th>'
        f'<th class="num">wall (s)</th><th>metrics</th></tr></thead><tbody>{"".join(rows)}</tbody></table></section>'
    )


def _pipeline(job: JobView) -> str:
    report = job.report
    labels = report.get("pipeline")
    if not isinstance(labels, list) or not labels:
        labels = [_step_label(s) for s in job.spec.get("steps") or [] if isinstance(s, dict)]
    items = ['<span class="step">input model</span>']
    items += [f'<span class="step">{escape(str(lab))}</span>' for lab in labels]
    items.append('<span class="step">ONNX</span>')
    return '<div class="pipeline">' + '<span class="arrow">&rarr;</span>'.join(items) + "</div>"


def _artifact_links(job: JobView) -> str:
    if not job.artifacts:
        return ""
    rows = "".join(
        f'<tr><td><a href="/v1/artifacts/{escape(a.id)}/content">{escape(a.name)}</a></td><td>{escape(a.kind)}</td>'
        f'<td class="num">{fmt_bytes(a.size_bytes)}</td><td><code>{escape(a.sha256[:16])}</code></td></tr>'
        for a in job.artifacts
    )
    return (
        '<section id="artifacts"><h2>Artifacts</h2><table><thead><tr><th>name</th><th>kind</th>'
        f'<th class="num">size</th><th>sha256</th></tr></thead><tbody>{rows}</tbody></table></section>'
    )


def render_report(job: JobView) -> str:
    """The job's report page: pipeline, before/after table and charts, curves, step times, budget."""
    report = job.report
    task = report.get("task") or job.spec.get("task") or ""
    header = (
        f"<header><h1>modelpress report: {escape(job.id)}</h1>"
        f'<div class="sub">{_badge(job.status)} {escape(job.phase)} &middot; model {escape(str(job.spec.get("model", "")))}'
        f" &middot; task {escape(str(task))} &middot; created {_when(job.created_at)}"
        f" &middot; finished {_when(job.finished_at)} &middot; <a style=\"color:#b9c0cc\" href=\"/\">all jobs</a></div></header>"
    )
    parts = [f'<section id="pipeline"><h2>Pipeline</h2>{_pipeline(job)}</section>']
    if job.error:
        err = job.error
        step = f" (step {escape(str(err.get('step')))})" if err.get("step") else ""
        parts.append(
            f'<section class="error" id="error"><h2>Error{step}</h2><p><code>{escape(str(err.get("code", "")))}</code> '
            f'{escape(str(err.get("message", "")))}</p></section>'
        )
    if report.get("input") or report.get("output"):
        parts.append(f'<section id="compare"><h2>Before / after</h2>{_gains(report)}{_comparison_table(report)}</section>')
        parts.append(_charts(report))
    elif job.status not in TERMINAL:
        parts.append('<section><p class="muted">The job is still running; the report appears when it finishes.</p></section>')
    else:
        parts.append('<section><p class="muted">This job has no report.</p></section>')
    parts += [_budget_and_fidelity(report), _curves(report), _step_times(report), _artifact_links(job)]
    refresh = None if job.status in TERMINAL else 5
    return _page(f"modelpress report {job.id}", header + "<main>" + "".join(p for p in parts if p) + "</main>", refresh)


# -- the dashboard ----------------------------------------------------------------------------


def render_dashboard(jobs: list[JobView], status: str | None = None, refresh: int = 5) -> str:
    """A read-only list of jobs: status, phase, progress bar, created time, report and artifact links."""
    filters = " ".join(
        f'<a href="/?status={s}">{s}</a>' if s != status else f"<strong>{s}</strong>"
        for s in ("queued", "running", "succeeded", "failed", "cancelled")
    )
    rows = []
    for j in jobs:
        p = j.progress or {}
        percent = 100.0 if j.status == "succeeded" else float(p.get("percent") or 0.0)
        percent = min(max(percent, 0.0), 100.0)
        step = f"step {fmt(p.get('step'))}/{fmt(p.get('steps'))}" if p.get("steps") else ""
        epoch = f" &middot; epoch {fmt(p.get('epoch'))}/{fmt(p.get('epochs'))}" if p.get("epoch") is not None else ""
        links = [f'<a href="/v1/jobs/{escape(j.id)}/report.html">report</a>']
        links += [f'<a href="/v1/artifacts/{escape(a.id)}/content">{escape(a.name)}</a>' for a in j.artifacts]
        err = ""
        if j.error:
            err = f'<div class="muted">{escape(str(j.error.get("code", "")))}: {escape(str(j.error.get("message", ""))[:160])}</div>'
        pipeline = " &rarr; ".join(escape(_step_label(s)) for s in j.spec.get("steps") or [] if isinstance(s, dict))
        rows.append(
            f'<tr class="job" data-status="{escape(j.status)}"><td><code>{escape(j.id)}</code><div class="muted">{pipeline}</div></td>'
            f"<td>{_badge(j.status)}</td><td>{escape(j.phase)}{err}</td>"
            f'<td><div class="bar" title="{percent:.0f}%"><span style="width:{percent:.1f}%"></span></div>'
            f'<div class="muted">{percent:.0f}% {step}{epoch}</div></td>'
            f"<td>{_when(j.created_at)}</td><td>{' &middot; '.join(links)}</td></tr>"
        )
    table = (
        "<table><thead><tr><th>job</th><th>status</th><th>phase</th><th>progress</th><th>created</th><th>links</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows else '<p class="muted">No jobs yet. Submit one with <code>modelpress optimize</code>.</p>'
    )
    header = (
        '<header><h1>modelpress</h1><div class="sub">jobs (refreshes every '
        f'{int(refresh)} s) &middot; <a style="color:#b9c0cc" href="/">all</a> {filters}</div></header>'
    )
    return _page("modelpress jobs", f"{header}<main><section>{table}</section></main>", refresh)
