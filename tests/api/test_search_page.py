"""The report page of a search job: trials table, the scatter chart with the front, winner and constraint."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from api.services.search_page import search_view
from tests.api.report_samples import insert_job, sample_report, search_report


def test_search_view_rows_and_chart() -> None:
    view = search_view(search_report())
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


def test_the_page_says_why_trial_latencies_differ_from_the_before_after_table() -> None:
    report = search_report()
    view = search_view(report)
    assert view is not None
    table_ms = report["output"]["latency_ms"]["median"]
    assert "timed again together at the end, interleaved" in view.latency_note
    assert f"winner: 0.1 ms re-timed, {table_ms:.4g} ms in its job" in view.latency_note
    for t in report["search"]["trials"]:
        t.pop("latency_ms_remeasured", None)
    plain = search_view(report)
    assert plain is not None and plain.latency_note == ""  # nothing re-timed: nothing to explain


def test_a_search_with_no_improvement_names_the_closest_trial() -> None:
    report = search_report()
    report["search"]["best"] = None
    report["search"]["closest"] = {"trial": 1, "label": "quantize static", "objective_ratio": 1.02}
    view = search_view(report)
    assert view is not None and not any(r.winner for r in view.rows)
    assert view.best == "none beat the input; closest: trial 1 (quantize static) at 1.02x the input's latency"


def test_report_page_of_a_search_has_the_trials_table(client: TestClient) -> None:
    job_id, _ = insert_job(report=search_report())
    page = client.get(f"/v1/jobs/{job_id}/report.html")
    assert page.status_code == 200
    html = page.text
    assert 'id="search"' in html and 'class="winner"' in html and "chart-search-pareto" in html
    assert "quantize &lt;fp16&gt;" in html and "<fp16>" not in html
    assert '/v1/jobs/job_a/report.html' in html
    assert 'id="search-latency-note"' in html and "in its job" in html
