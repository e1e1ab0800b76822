"""The report page of a search job: trials table, the scatter chart with the front, winner and constraint."""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient

from api.services.search_page import search_view
from tests.api.report_samples import insert_job, sample_report


def _search_report() -> dict[str, Any]:
    trials = [
        {"index": 0, "label": "quantize dynamic", "state": "succeeded", "job_id": "job_a", "met": True,
         "metric": 0.95, "metric_name": "accuracy", "size_bytes": 30_000, "latency_ms": 0.2,
         "latency_ms_remeasured": 0.1, "pareto": True},
        {"index": 1, "label": "quantize fp16", "state": "succeeded", "job_id": "job_b", "met": True,
         "metric": 0.96, "size_bytes": 60_000, "latency_ms": 0.3, "latency_ms_remeasured": 0.15, "pareto": True},
        {"index": 2, "label": "quantize <fp16>", "state": "skipped", "job_id": None,
         "reason": "cannot beat the best: estimated size ratio 0.50 vs 0.27 measured"},
        {"index": 3, "label": "prune 0.95", "state": "failed", "job_id": "job_d", "met": False, "metric": 0.2,
         "size_bytes": 5_000, "latency_ms": 0.05, "misses": ["quality: accuracy drop 0.76 > 0.02"]},
    ]
    section = {"objective": "latency", "constraints": {"max_accuracy_drop": 0.02}, "trials": trials,
               "best": {"trial": 0, "job_id": "job_a", "label": "quantize dynamic"}, "done": 3, "skipped": 1,
               "total": 4}
    report = sample_report()
    report["input"]["metric"] = {"name": "accuracy", "value": report["input"]["accuracy"]}
    return {**report, "search": section}


def test_search_view_rows_and_chart() -> None:
    view = search_view(_search_report())
    assert view is not None and view.best == "trial 0 (quantize dynamic)"
    assert [r.winner for r in view.rows] == [True, False, False, False]
    assert view.rows[0].latency_text == "0.1"  # the re-measured latency, not the trial's own
    assert view.rows[2].note.startswith("cannot beat the best")
    svg = str(view.chart)
    # Three trials have both numbers (the skipped one has none); front, constraint and input line drawn.
    assert len(re.findall(r'id="chart-search-trial-\d+"', svg)) == 3
    for gid in ("pareto", "constraint", "input"):
        assert f'id="chart-search-{gid}"' in svg
    assert search_view(sample_report()) is None


def test_report_page_of_a_search_has_the_trials_table(client: TestClient) -> None:
    job_id, _ = insert_job(report=_search_report())
    page = client.get(f"/v1/jobs/{job_id}/report.html")
    assert page.status_code == 200
    html = page.text
    assert 'id="search"' in html and 'class="winner"' in html and "chart-search-pareto" in html
    assert "quantize &lt;fp16&gt;" in html and "<fp16>" not in html
    assert '/v1/jobs/job_a/report.html' in html
