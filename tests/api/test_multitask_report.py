"""The report page of a multi-task job: a Tasks section with each task's before/after, the few-shot table and
the shared model's size against N separate models, and one chart per task's curve series."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.api.report_samples import chart_shapes, insert_job
from tests.models.test_multitask_view import multitask_report


def test_report_page_shows_tasks(client: TestClient) -> None:
    job_id, _ = insert_job(report=multitask_report())
    r = client.get(f"/v1/jobs/{job_id}/report.html")
    assert r.status_code == 200
    page = r.text
    assert '<section id="tasks">' in page and "Few-shot tasks" in page
    for text in ("parity", "94.8%", "+43.1 points", "24 train, 8 validation (carved from train), 597 eval",
                 "55.0%", "one model of 14,510 parameters"):
        assert text in page, text
    lines = {k for k in chart_shapes(page) if k.endswith("-line")}
    assert {"chart-curve-0-loss-parity-line", "chart-curve-0-accuracy-parity-line"} <= lines, lines


def test_report_page_shows_the_adapter_merge(client: TestClient) -> None:
    from tests.models.test_multitask_view import merge_report

    job_id, _ = insert_job(report=merge_report())
    page = client.get(f"/v1/jobs/{job_id}/report.html").text
    assert "Adapter merge (validation accuracy)" in page and "linear ★" in page
    for text in ("each task&#39;s adapter alone", "ties (density 0.5)", "68.2%", "not possible: All adapters",
                 "chosen: linear: highest mean validation accuracy over the tasks (84.8%)"):
        assert text in page, text
    job_id, _ = insert_job(report={**merge_report(), "steps": []})
    assert "Adapter merge" not in client.get(f"/v1/jobs/{job_id}/report.html").text
