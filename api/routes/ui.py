"""Read-only HTML: the dashboard (``GET /``) and a job's self-contained report page."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from api.errors import problem_response
from api.services import report_html

router = APIRouter(tags=["ui"])

# Pages are self-contained: forbid every external fetch, allow only inline styles.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'none'; base-uri 'none'"
_HEADERS = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def dashboard(status: str | None = Query(None, max_length=16), limit: int = Query(100, ge=1, le=500)) -> Response:
    """The newest jobs with status, phase, progress, and links to reports and artifacts."""
    jobs = report_html.list_jobs(status=status or None, limit=limit)
    return HTMLResponse(report_html.render_dashboard(jobs, status=status), headers=_HEADERS)


@router.get("/v1/jobs/{job_id}/report.html", response_class=HTMLResponse)
def job_report(request: Request, job_id: str) -> Response:
    """One job's report as a single HTML page (inline CSS and SVG, no external requests)."""
    job = report_html.load_job(job_id)
    if job is None:
        return problem_response(request, 404, "not_found", f"job {job_id!r} not found")
    return HTMLResponse(report_html.render_report(job), headers=_HEADERS)
