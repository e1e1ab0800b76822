"""The job report page: rendered from a job row with a realistic report, self-contained, charts drawn."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from tests.api.report_samples import bar_widths, chart_shapes, insert_job, sample_report

EXTERNAL = re.compile(r"https?://|<script[^>]*\bsrc=|<link\b|@import|url\((?!#)", re.I)


def test_report_page_has_table_charts_curves_and_no_external_resources(client: TestClient) -> None:
    job_id, art_ids = insert_job()
    r = client.get(f"/v1/jobs/{job_id}/report.html")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    page = r.text
    assert not EXTERNAL.search(page), EXTERNAL.search(page)
    # Pipeline and the before/after table with the report's numbers.
    for text in ("prune structured 0.5", "distill 4 ep", "quantize dynamic", "11,689,512", "5,871,236",
                 "1,814,083,944", "44.00 MB", "5.62 MB", "23.4", "7.8", "0.9312", "0.9247", "-0.0065",
                 "7.83\u00d7", "3.00\u00d7", "0.99871", "met"):
        assert text in page, text
    # Before/after bars (5 metrics x 2) and the wall-time bars (3 steps): all drawn with a width.
    widths = bar_widths(page)
    assert len(widths) == 5 * 2 + 3
    assert all(w > 0 for w in widths)
    # The bigger "before" bar is wider than the "after" bar for size.
    before_w, after_w = bar_widths(page, "chart-size-")
    assert before_w > after_w * 5
    # Training curves: one line per series (loss, eval metric, lr) with 4 points each, not flat.
    lines = {k: v for k, v in chart_shapes(page).items() if k.endswith("-line")}
    assert sorted(lines) == ["chart-curve-1-eval-metric-line", "chart-curve-1-loss-line", "chart-curve-1-lr-line"]
    for coords in lines.values():
        assert len(coords) == 4
        assert len({y for _, y in coords}) > 1
    # Loss falls, so its y coordinate (SVG grows downward) rises.
    loss = lines["chart-curve-1-loss-line"]
    assert loss[-1][1] > loss[0][1]
    # Artifact download links.
    for art_id in art_ids:
        assert f"/v1/artifacts/{art_id}/content" in page


def test_report_escapes_user_controlled_text(client: TestClient) -> None:
    report = sample_report()
    report["pipeline"] = ['<script>alert("x")</script>']
    report["steps"][0]["label"] = "<img src=x onerror=alert(1)>"
    report["steps"][1]["label"] = "distill $\\frac{ (not math)"  # matplotlib must not parse it as mathtext
    job_id, _ = insert_job(status="failed", report=report, phase="<b>evil</b>",
                           error={"code": "step_failed", "message": "<iframe src='//x'>", "step": "prune"})
    r = client.get(f"/v1/jobs/{job_id}/report.html")
    assert r.status_code == 200
    page = r.text
    assert "<script>" not in page and "<img" not in page and "<iframe" not in page and "<b>evil" not in page
    assert "&lt;script&gt;" in page and "&lt;iframe" in page
    assert "step_failed" in page and "(step prune)" in page
    assert "distill $\\frac{ (not math)" in page


def test_report_of_a_running_job_without_report_refreshes(client: TestClient) -> None:
    job_id, _ = insert_job(status="running", phase="training epoch 2/4",
                           progress={"step": 2, "steps": 3, "percent": 45.0, "epoch": 2, "epochs": 4})
    page = client.get(f"/v1/jobs/{job_id}/report.html").text
    assert 'http-equiv="refresh"' in page
    assert "training epoch 2/4" in page
    assert "still running" in page


def test_finished_report_does_not_refresh(client: TestClient) -> None:
    job_id, _ = insert_job()
    assert 'http-equiv="refresh"' not in client.get(f"/v1/jobs/{job_id}/report.html").text


def test_report_renders_partial_reports(client: TestClient) -> None:
    report = {"input": {"size_bytes": 1000}, "output": {"size_bytes": 250}}
    job_id, _ = insert_job(report=report)
    page = client.get(f"/v1/jobs/{job_id}/report.html").text
    assert "4.00\u00d7" in page
    before_w, after_w = bar_widths(page)
    assert before_w == pytest.approx(after_w * 4, rel=0.01)
    assert not any(k.endswith("-line") for k in chart_shapes(page))


def test_unknown_job_is_problem_json_404(client: TestClient) -> None:
    r = client.get("/v1/jobs/job_nope/report.html")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "not_found"
    assert "job_nope" in r.json()["detail"]


def test_lm_report_shows_lm_rows_and_generations_side_by_side(client: TestClient) -> None:
    import html as html_lib

    from tests.api.report_samples import lm_report

    job_id, _ = insert_job(report=lm_report())
    page = client.get(f"/v1/jobs/{job_id}/report.html").text
    for text in ("perplexity (eval text)", "12.41", "12.97", "decode tokens/s (KV cache, batch 1)", "9.8", "27.3",
                 "2.79\u00d7 faster", "prefill 128 tokens median (ms)", "412", "session peak memory", "3.26 GB",
                 "next-token top-1 agreement", "0.9137", "mean KL (nats)", "0.0412", "perplexity +5.00%",
                 "+4.51%", "faster decoding"):
        assert text in page, text
    # generations: one row per prompt, the input's continuation left of the output's, escaped
    table = page[page.index('<table class="generations">'):]
    table = table[: table.index("</table>")]
    rows = re.findall(r'<tr class="generation"><td class="prompt">(.*?)</td><td class="before">(.*?)</td>'
                      r'<td class="after">(.*?)</td></tr>', table, re.S)
    assert [tuple(html_lib.unescape(c) for c in r) for r in rows] == [
        ("This License applies to", " any program or other work", " any work or program"),
        ("TERMS AND CONDITIONS", " FOR USE, REPRODUCTION", " FOR USE, REPRODUCTION"),
        ("You may convey <b>verbatim</b>", " copies of the Program's <i>source</i>", " copies of the source code"),
    ]
    assert "<b>verbatim" not in page and "&lt;b&gt;verbatim" in page
    # perplexity and decode-speed charts beside the usual ones
    assert bar_widths(page, "chart-perplexity-") and bar_widths(page, "chart-decode-")
    before_w, after_w = bar_widths(page, "chart-decode-")
    assert after_w > before_w * 2.5
    # the latency chart says it is the prefill; the headline leads with perplexity, then decode speed
    assert "prefill 128 tokens median (ms)" in page[page.index('id="charts"'):]
    gains = page[page.index('<p class="gains">'):]
    gains = gains[: gains.index("</p>")]
    assert gains.index("perplexity") < gains.index("faster decoding") < gains.index("smaller")
