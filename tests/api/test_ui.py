"""The read-only dashboard at ``/``: jobs with status, phase, progress, and report/artifact links."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from tests.api.report_samples import insert_job

EXTERNAL = re.compile(r"https?://|<script[^>]*\bsrc=|<link\b|@import|url\(", re.I)


def test_dashboard_lists_jobs_with_progress_and_links(client: TestClient) -> None:
    done, arts = insert_job()
    running, _ = insert_job(status="running", phase="training epoch 2/4",
                            progress={"step": 2, "steps": 3, "percent": 45.0, "epoch": 2, "epochs": 4})
    failed, _ = insert_job(status="failed", phase="failed", progress={"step": 1, "steps": 3, "percent": 10.0},
                           error={"code": "step_failed", "message": "prune <exploded>", "step": "prune"})
    r = client.get("/")
    assert r.status_code == 200
    page = r.text
    assert not EXTERNAL.search(page)
    assert 'http-equiv="refresh"' in page
    rows = re.findall(r'<tr class="job" data-status="(\w+)">', page)
    assert sorted(rows) == ["failed", "running", "succeeded"]
    for job_id in (done, running, failed):
        assert f'href="/v1/jobs/{job_id}/report.html"' in page
    for art_id in arts:
        assert f'href="/v1/artifacts/{art_id}/content"' in page
    widths = re.findall(r'<span style="width:([\d.]+)%">', page)
    assert sorted(float(w) for w in widths) == [10.0, 45.0, 100.0]
    assert "step 2/3" in page and "epoch 2/4" in page and "training epoch 2/4" in page
    assert "prune &lt;exploded&gt;" in page and "<exploded>" not in page


def test_dashboard_filters_by_status_and_handles_no_jobs(client: TestClient) -> None:
    assert "No jobs yet" in client.get("/").text
    insert_job()
    insert_job(status="running", phase="exporting")
    page = client.get("/", params={"status": "running"}).text
    assert re.findall(r'data-status="(\w+)"', page) == ["running"]
