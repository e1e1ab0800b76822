"""The report and the dashboard in headless Chromium: what a person sees (bar lengths, labels), no external requests."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.main import create_app
from tests.api.report_samples import insert_job
from tests.client.cdp import Browser, distinct_colours, find_chromium, launch
from tests.e2e.harness import serve_in_thread

CHROMIUM = find_chromium()
# Set MODELPRESS_TEST_SCREENSHOTS=DIR to keep the screenshots and look at them.
SHOTS = Path(os.environ["MODELPRESS_TEST_SCREENSHOTS"]) if os.environ.get("MODELPRESS_TEST_SCREENSHOTS") else None
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")

# Every chart element with an id (bars, their value labels, curve lines): its box on screen and its text.
CHART_BOXES = """JSON.stringify(Object.fromEntries(Array.from(document.querySelectorAll('svg [id^="chart-"]')).map(e => {
  const b = e.getBoundingClientRect();
  return [e.id, {left: b.left, right: b.right, top: b.top, bottom: b.bottom, width: b.width, height: b.height,
                 text: e.textContent.trim()}]; })))"""

MB = 1024**2
# The sample report's values, chart by chart (before, after), and the steps' wall times.
BEFORE_AFTER = {
    "size": (46_137_344 / MB, 5_890_113 / MB),
    "latency": (23.4, 7.8),
    "params": (11_689_512, 5_871_236),
    "macs": (1_814_083_944, 911_331_112),
    "accuracy": (0.9312, 0.9247),
}
WALL_S = (3.2, 61.7, 1.4)


@pytest.fixture
def server(pg_env: str) -> Iterator[str]:
    """The API served by uvicorn in a thread, on this test's database."""
    with serve_in_thread(create_app()) as url:
        yield url


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    assert CHROMIUM is not None
    b = launch(CHROMIUM, tmp_path)
    yield b
    b.close()


def _assert_screenshot(png: bytes) -> None:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 800 and height >= 400
    assert len(png) > 5_000
    assert distinct_colours(png) > 8  # text, bars in two colours, badges: far from a blank page


def _assert_local_only(browser: Browser, base: str) -> None:
    urls = browser.requested_urls()
    assert urls, "the network log is empty: the monitor did not work"
    outside = [u for u in urls if not u.startswith(base + "/")]
    assert outside == []


def test_report_renders_with_charts_and_no_external_requests(
    server: str, browser: Browser, tmp_path: Path
) -> None:
    job_id, _ = insert_job()
    browser.open(f"{server}/v1/jobs/{job_id}/report.html")
    assert browser.evaluate("document.title") == f"modelpress report {job_id}"
    boxes = json.loads(browser.evaluate(CHART_BOXES))
    bars = {k: v for k, v in boxes.items() if "-bar-" in k}
    lines = {k: v for k, v in boxes.items() if k.endswith("-line")}
    assert len(bars) == 13 and len(lines) == 3, sorted(boxes)
    assert all(b["width"] > 0 and b["height"] > 0 for b in bars.values())
    assert all(b["width"] > 50 and b["height"] > 10 for b in lines.values())  # a drawn curve, not a dot
    for name, values in BEFORE_AFTER.items():
        _assert_bars_encode(boxes, f"chart-{name}", values)
    _assert_bars_encode(boxes, "chart-steps", WALL_S)
    assert browser.evaluate("document.querySelectorAll('table.compare tbody tr').length") >= 5
    png = browser.screenshot(SHOTS / "report.png" if SHOTS else tmp_path / "report.png")
    _assert_screenshot(png)
    _assert_local_only(browser, server)


def _assert_bars_encode(boxes: dict[str, dict[str, Any]], chart: str, values: tuple[float, ...]) -> None:
    """Bars share a baseline, their lengths are proportional to the values, and each value label sits clear of its bar."""
    bars = [boxes[f"{chart}-bar-{i}"] for i in range(len(values))]
    labels = [boxes[f"{chart}-value-{i}"] for i in range(len(values))]
    longest = max(range(len(values)), key=lambda i: values[i])
    px_per_unit = bars[longest]["width"] / values[longest]
    for bar, label, value in zip(bars, labels, values, strict=True):
        assert abs(bar["left"] - bars[0]["left"]) <= 1, (chart, bar, bars[0])
        assert abs(bar["width"] - value * px_per_unit) <= 1.5, (chart, value, bar["width"], value * px_per_unit)
        overlap_x = min(bar["right"], label["right"]) - max(bar["left"], label["left"])
        overlap_y = min(bar["bottom"], label["bottom"]) - max(bar["top"], label["top"])
        assert overlap_x <= 0 or overlap_y <= 0, (chart, "label over its bar", bar, label)
        assert label["left"] >= bar["right"] - 0.5, (chart, bar, label)
        shown = float(label["text"].split()[0].replace(",", ""))
        assert shown == pytest.approx(value, rel=0.01), (chart, label["text"], value)


def test_dashboard_renders_and_makes_no_external_requests(
    server: str, browser: Browser, tmp_path: Path
) -> None:
    insert_job()
    insert_job(status="running", phase="training epoch 1/4",
               progress={"step": 2, "steps": 3, "percent": 40.0, "epoch": 1, "epochs": 4})
    browser.open(f"{server}/")
    assert browser.evaluate("document.querySelectorAll('tr.job').length") == 2
    widths = browser.evaluate(
        "Array.from(document.querySelectorAll('.progress > span')).map(e => e.getBoundingClientRect().width)"
    )
    assert sorted(widths)[0] > 0 and sorted(widths)[1] > sorted(widths)[0]
    png = browser.screenshot(SHOTS / "dashboard.png" if SHOTS else tmp_path / "dashboard.png")
    _assert_screenshot(png)
    _assert_local_only(browser, server)
    assert httpx.get(f"{server}/").status_code == 200


def test_login_form_opens_the_report(server: str, browser: Browser, monkeypatch: pytest.MonkeyPatch) -> None:
    """With an API key set, the browser is sent to the login form; the key typed there opens the report."""
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_API_KEY", "s3cret")
    get_settings.cache_clear()
    job_id, _ = insert_job()
    browser.open(f"{server}/v1/jobs/{job_id}/report.html")
    assert browser.evaluate("location.pathname") == "/login"
    assert browser.evaluate("document.querySelectorAll('tr.job, svg.chart').length") == 0
    mark = len(browser.events)
    browser.evaluate("document.getElementById('key').value = 's3cret'; document.querySelector('form.login').submit(); 1")
    browser.wait_event("Page.loadEventFired", mark)
    assert browser.evaluate("location.pathname") == f"/v1/jobs/{job_id}/report.html"
    assert browser.evaluate("document.title") == f"modelpress report {job_id}"
    assert browser.evaluate("document.cookie") == ""  # HttpOnly: page scripts cannot read the session
    assert browser.evaluate("document.querySelectorAll('svg.chart').length") >= 9


def test_network_monitor_sees_external_requests(browser: Browser) -> None:
    """The check above is meaningful: a page that does reference the outside is caught."""
    html = '<html><body><img src="http://example.invalid/pixel.png"></body></html>'
    browser.open("data:text/html," + html)
    assert any(u.startswith("http://example.invalid/") for u in browser.requested_urls())


def test_a_slower_output_shows_a_red_warning(server: str, browser: Browser) -> None:
    """A job whose output is 3.2x slower: the report page and the dashboard row say 'slower', in red."""
    from models.report_view import regressions
    from tests.api.report_samples import sample_report

    report = sample_report()
    report["input"]["latency_ms"] = {"median": 0.27, "p90": 0.3, "mean": 0.28}
    report["output"]["latency_ms"] = {"median": 0.864, "p90": 0.9, "mean": 0.87}
    report["gains"]["latency_ratio"] = 0.27 / 0.864
    report["warnings"] = regressions(report["input"], report["output"])
    job_id, _ = insert_job(report=report)
    shown = """JSON.stringify(Array.from(document.querySelectorAll('.warning')).map(e => {
      const b = e.getBoundingClientRect();
      return {text: e.textContent.trim(), colour: getComputedStyle(e).color, visible: b.width > 0 && b.height > 0
              && getComputedStyle(e).visibility === 'visible'}; }))"""
    for url in (f"{server}/v1/jobs/{job_id}/report.html", f"{server}/"):
        browser.open(url)
        warnings = json.loads(browser.evaluate(shown))
        assert len(warnings) == 1, (url, warnings)
        w = warnings[0]
        assert "3.2\u00d7 slower than the input model (0.27 \u2192 0.864 ms median, 0.3 \u2192 0.9 ms p90)" in w["text"], w
        assert w["visible"], w
        r, g, b = (int(v) for v in w["colour"][w["colour"].index("(") + 1:-1].split(",")[:3])
        assert r > 150 and g < 100 and b < 100, w["colour"]  # red
    browser.open(f"{server}/v1/jobs/{job_id}/report.html")
    gains = browser.evaluate("document.querySelector('p.gains').textContent")
    assert "3.20\u00d7 slower" in gains and "faster" not in gains, gains


# What a person reads in each generation row: the prompt, then the input's and the output's text, left to right.
GENERATION_ROWS = """JSON.stringify(Array.from(document.querySelectorAll('table.generations tbody tr')).map(tr =>
  Array.from(tr.cells).map(td => ({text: td.innerText, left: td.getBoundingClientRect().left,
                                   width: td.getBoundingClientRect().width}))))"""


def test_lm_report_shows_generations_before_and_after_side_by_side(
    server: str, browser: Browser, tmp_path: Path
) -> None:
    from tests.api.report_samples import lm_report

    report = lm_report()
    job_id, _ = insert_job(report=report)
    browser.open(f"{server}/v1/jobs/{job_id}/report.html")
    rows = json.loads(browser.evaluate(GENERATION_ROWS))
    want = [(i["prompt"], i["text"], o["text"])
            for i, o in zip(report["input"]["generations"], report["output"]["generations"], strict=True)]
    assert [tuple(c["text"].strip() for c in row) for row in rows] == [tuple(t.strip() for t in w) for w in want]
    for prompt, before, after in rows:
        assert prompt["left"] < before["left"] < after["left"]  # side by side, input left of output
        assert before["width"] > 100 and after["width"] > 100
    # the escaped markup in a prompt is shown as text, not as an element
    assert browser.evaluate("document.querySelectorAll('table.generations b, table.generations i').length") == 0
    headers = browser.evaluate("Array.from(document.querySelectorAll('table.generations th')).map(e => e.innerText)")
    assert headers == ["prompt", "before (input model)", "after (output model)"]
    png = browser.screenshot(SHOTS / "lm-report.png" if SHOTS else tmp_path / "lm-report.png")
    _assert_screenshot(png)
    _assert_local_only(browser, server)


# Each trial marker's centre and size, the constraint line's height, the front's points, as drawn on screen.
SEARCH_SHAPES = """JSON.stringify((() => {
  const box = e => { const b = e.getBoundingClientRect();
                     return {x: b.left + b.width / 2, y: b.top + b.height / 2, w: b.width, h: b.height}; };
  const marks = Array.from(document.querySelectorAll('[id^="chart-search-trial-"]'));
  const fill = e => getComputedStyle(e.querySelector('use') || e).fill;  // the marker drawn, not its def
  return {trials: marks.map(e => ({id: e.id, fill: fill(e), ...box(e)})),
          constraint: box(document.getElementById('chart-search-constraint')),
          input: box(document.getElementById('chart-search-input')),
          front: box(document.getElementById('chart-search-pareto')),
          labels: Object.fromEntries(Array.from(document.querySelectorAll('#search svg text'))
            .map(e => e.textContent.trim()).filter(t => t.startsWith('#')).map(t => [t.split(' ')[0], t])),
          legend: Array.from(document.querySelectorAll('[id="chart-search-legend"] text')).map(e => e.textContent.trim()),
          rows: Array.from(document.querySelectorAll('#search tbody tr')).map(tr => ({
            cls: tr.className, cells: Array.from(tr.cells).map(td => td.innerText.trim())}))};
})())"""


def test_search_report_scatter_places_every_trial_by_its_numbers(
    server: str, browser: Browser, tmp_path: Path
) -> None:
    """Markers sit where their latency and metric put them, the budget line at input minus max drop, the winner
    is the biggest marker and the trial that missed the budget is hollow; the table lists every trial."""
    from tests.api.report_samples import search_report

    report = search_report()
    job_id, _ = insert_job(report=report)
    browser.open(f"{server}/v1/jobs/{job_id}/report.html")
    got = json.loads(browser.evaluate(SEARCH_SHAPES))
    drawn = [t for t in report["search"]["trials"] if "metric" in t]  # the skipped trial has no point
    marks = {t["id"]: t for t in got["trials"]}
    assert len(marks) == len(drawn) == 3, marks
    pts = [(t.get("latency_ms_remeasured", t["latency_ms"]), t["metric"], marks[f"chart-search-trial-{t['index']}"])
           for t in drawn]
    # Both axes linear: screen position is an affine map of the value (y grows downwards). Trials 0 and 1
    # (0.95, 0.96) met the budget; trial 3 (0.2) is pinned below the scale so that 0.95 and 0.96 stay apart.
    (xa, ya, a), (xb, yb, b), (xc, yc, c) = pts
    sx, sy = (b["x"] - a["x"]) / (xb - xa), (b["y"] - a["y"]) / (yb - ya)
    assert sx > 0 and sy < -200, (sx, sy)  # 0.01 of accuracy is over 2 px: the two front trials read apart
    assert abs(a["x"] + (xc - xa) * sx - c["x"]) <= 1.5, (xc, c)
    floor = report["input"]["metric"]["value"] - report["search"]["constraints"]["max_accuracy_drop"]
    assert abs(a["y"] + (floor - ya) * sy - got["constraint"]["y"]) <= 1.5, got["constraint"]
    assert abs(a["y"] + (report["input"]["metric"]["value"] - ya) * sy - got["input"]["y"]) <= 1.5
    assert got["constraint"]["y"] + 10 < c["y"] < a["y"] + (yc - ya) * sy  # below the budget, above its value
    assert got["labels"]["#3"] == "#3 0.2 ↓", got["labels"]  # its value printed beside it
    # The front joins the two trials on it: its box spans from the one to the other.
    front = [m for t, (_, _, m) in zip(drawn, pts, strict=True) if t.get("pareto")]
    assert abs(got["front"]["w"] - abs(front[0]["x"] - front[1]["x"])) <= 2, (got["front"], front)
    winner = marks["chart-search-trial-0"]
    assert all(winner["w"] > m["w"] + 2 for k, m in marks.items() if k != "chart-search-trial-0")
    assert marks["chart-search-trial-3"]["fill"] in ("rgb(255, 255, 255)", "#ffffff"), marks  # missed: hollow
    assert marks["chart-search-trial-1"]["fill"] not in ("rgb(255, 255, 255)", "#ffffff", "none")
    assert got["legend"] == ["met the constraints", "missed them", "winner", "Pareto front",
                             "budget (input minus max drop)", "input model", "off the scale (value shown)"]
    rows = got["rows"]
    assert [r["cells"][2] for r in rows] == ["succeeded", "succeeded", "skipped", "failed"]
    assert rows[0]["cls"] == "winner" and rows[0]["cells"][0].endswith("★")
    assert rows[0]["cells"][5] == "0.1"  # the winner's latency as re-measured at the end
    png = browser.screenshot(SHOTS / "search-report.png" if SHOTS else tmp_path / "search-report.png")
    _assert_screenshot(png)
    _assert_local_only(browser, server)


def test_an_lm_report_after_lora_reads_as_people_need_it(server: str, browser: Browser) -> None:
    """LoRA on a small LM: the headline leads with perplexity (no '1.00x smaller'), tokens/s are whole numbers
    with separators, the latency chart says prefill, the eval curve says loss."""
    from tests.api.report_samples import lm_report

    report = lm_report()
    report["output"] = {**report["output"], "size_bytes": report["input"]["size_bytes"], "perplexity": 11.54,
                        "decode": {"tokens_per_s": 10_123.4, "ms_per_token": 0.0988, "new_tokens": 32}}
    report["gains"] = {**report["gains"], "size_ratio": 1.0, "decode_speedup": 10_123.4 / 9.8}
    report["steps"] = [{"index": 0, "type": "finetune", "label": "finetune (lora)", "wall_s": 12.0, "metrics": {},
                        "curve": [{"epoch": e, "loss": 3.0 / e, "eval_metric": 2.8 / e, "eval_loss": 2.8 / e,
                                   "perplexity": 16.4 / e, "lr": 1e-3} for e in (1, 2, 3)]}]
    job_id, _ = insert_job(report=report)
    browser.open(f"{server}/v1/jobs/{job_id}/report.html")
    gains = browser.evaluate("document.querySelector('p.gains').innerText")
    assert gains.startswith("\u22127.0 % perplexity"), gains
    assert "smaller" not in gains and "faster decoding" in gains
    table = browser.evaluate("document.querySelector('table.compare').innerText")
    assert "10,123" in table and "e+" not in table, table
    charts = browser.evaluate("document.querySelector('#charts').textContent")
    assert "prefill 128 tokens median (ms)" in charts
    curves = browser.evaluate("document.querySelector('#curves').textContent")
    assert "eval loss" in curves and "eval metric" not in curves
