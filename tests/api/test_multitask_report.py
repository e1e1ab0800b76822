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
    assert "adapters.zip" not in page  # no adapter files asked for: no line about them
    report = merge_report()
    report["steps"][0]["metrics"]["multitask"]["merge"]["adapter_files"] = {
        "base_bytes": 568_328_192, "base_load_s": 0.8, "adapter_bytes": {"topic": 9_813_576, "food": 9_813_576},
        "runs": [{"adapter": "topic", "matches_torch": True}, {"adapter": "food", "matches_torch": True}]}
    job_id, _ = insert_job(report=report)
    page = client.get(f"/v1/jobs/{job_id}/report.html").text
    assert ('<p class="adapter-files">adapters.zip: base 542.00 MB loaded once (0.8 s), one adapter file per task '
            "(topic 9.36 MB, food 9.36 MB); 2 runs switching adapters on that one model generated torch&#39;s tokens "
            "with each</p>") in page
    job_id, _ = insert_job(report={**merge_report(), "steps": []})
    assert "Adapter merge" not in client.get(f"/v1/jobs/{job_id}/report.html").text


def test_report_page_shows_each_task_s_output_and_budget(client: TestClient) -> None:
    report = multitask_report()
    report["output"] = {"tasks": [{"task": "parity", "output": "logits_parity", "accuracy": 0.93, "eval_rows": 597}]}
    report["budget"] = {"met": False, "max_accuracy_drop": 0.01, "accuracy_drop": 0.0181, "task": "parity",
                        "reason": "task 'parity': accuracy fell 1.81 points", "tasks": [
                            {"task": "parity", "reference": 0.9481, "reference_from": "input", "accuracy": 0.93,
                             "accuracy_drop": 0.0181, "met": False}]}
    job_id, _ = insert_job(report=report)
    page = client.get(f"/v1/jobs/{job_id}/report.html").text
    assert '<td class="num task-output">93.0%</td>' in page and "-1.8 points vs input (over 1.0)" in page
