"""The job report page: rendered from a job row with a realistic report, self-contained, charts drawn."""

from __future__ import annotations

import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.routes import ui
from api.services import report_html
from tests.api.report_samples import insert_job, sample_report

EXTERNAL = re.compile(r"https?://|<script[^>]*\bsrc=|<link\b|@import|url\(", re.I)


@pytest.fixture
def http(pg_env: str) -> TestClient:
    app = FastAPI()
    app.include_router(ui.router)
    return TestClient(app)


def _bars(page: str) -> list[float]:
    return [float(w) for w in re.findall(r'<rect class="bar[^"]*"[^>]*\bwidth="([\d.]+)"', page)]


def test_report_page_has_table_charts_curves_and_no_external_resources(http: TestClient) -> None:
    job_id, art_ids = insert_job()
    r = http.get(f"/v1/jobs/{job_id}/report.html")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    page = r.text
    assert not EXTERNAL.search(page), EXTERNAL.search(page)
    # Pipeline and the before/after table with the report's numbers.
    for text in ("prune structured 0.5", "distill 4 ep", "quantize dynamic", "11,689,512", "5,871,236",
                 "1,814,083,944", "44.00 MB", "5.62 MB", "23.4", "7.8", "0.9312", "0.9247", "-0.0065",
                 "7.83&times;", "3.00&times;", "0.99871", "met"):
        assert text in page, text
    # Before/after bars (5 metrics x 2) and the wall-time bars (3 steps): all drawn with a width.
    widths = _bars(page)
    assert len(widths) == 5 * 2 + 3
    assert all(w > 0 for w in widths)
    # The bigger "before" bar is wider than the "after" bar for size.
    size_chart = page.split('aria-label="size (MB)"')[1].split("</svg>")[0]
    before_w, after_w = _bars(size_chart)
    assert before_w > after_w * 5
    # Training curves: one polyline per series (loss, eval metric, lr) with 4 points each, not flat.
    polylines = re.findall(r'<polyline points="([^"]+)"', page)
    assert len(polylines) == 3
    for pts in polylines:
        coords = [tuple(map(float, p.split(","))) for p in pts.split()]
        assert len(coords) == 4
        assert len({y for _, y in coords}) > 1
    # Loss falls, so its y coordinate (SVG grows downward) rises.
    loss = [tuple(map(float, p.split(","))) for p in polylines[0].split()]
    assert loss[-1][1] > loss[0][1]
    # Artifact download links.
    for art_id in art_ids:
        assert f"/v1/artifacts/{art_id}/content" in page


def test_report_escapes_user_controlled_text(pg_env: str) -> None:
    report = sample_report()
    report["pipeline"] = ['<script>alert("x")</script>']
    report["steps"][0]["label"] = "<img src=x onerror=alert(1)>"
    job_id, _ = insert_job(status="failed", report=report, phase="<b>evil</b>",
                           error={"code": "step_failed", "message": "<iframe src='//x'>", "step": "prune"})
    view = report_html.load_job(job_id)
    assert view is not None
    page = report_html.render_report(view)
    assert "<script>" not in page and "<img" not in page and "<iframe" not in page and "<b>evil" not in page
    assert "&lt;script&gt;" in page and "&lt;iframe" in page
    assert "step_failed" in page and "(step prune)" in page


def test_report_of_a_running_job_without_report_refreshes(http: TestClient) -> None:
    job_id, _ = insert_job(status="running", phase="training epoch 2/4",
                           progress={"step": 2, "steps": 3, "percent": 45.0, "epoch": 2, "epochs": 4})
    page = http.get(f"/v1/jobs/{job_id}/report.html").text
    assert 'http-equiv="refresh"' in page
    assert "training epoch 2/4" in page
    assert "still running" in page


def test_report_renders_partial_reports(pg_env: str) -> None:
    report = {"input": {"size_bytes": 1000}, "output": {"size_bytes": 250}}
    job_id, _ = insert_job(report=report)
    view = report_html.load_job(job_id)
    assert view is not None
    page = report_html.render_report(view)
    assert "4.00&times;" in page
    assert len(_bars(page)) == 2
    assert "<polyline" not in page


def test_unknown_job_is_problem_json_404(http: TestClient) -> None:
    r = http.get("/v1/jobs/job_nope/report.html")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "not_found"
    assert "job_nope" in r.json()["detail"]
