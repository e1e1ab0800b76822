"""api.charts: matplotlib's SVG, inline-ready: bars proportional to their values, labels beside them, ids scoped."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from api import charts
from tests.api.report_samples import bar_widths, chart_shapes


def _ids(svg: str) -> list[str]:
    return re.findall(r'\bid="([^"]+)"', svg)


def test_before_after_bars_are_proportional_from_one_baseline() -> None:
    svg = charts.before_after("size", "size (MB)", 44.0, 5.62, " MB")
    assert svg.startswith('<svg class="chart" role="img" aria-label="size (MB)"')
    shapes = chart_shapes(svg)
    before, after = shapes["chart-size-bar-0"], shapes["chart-size-bar-1"]
    assert min(x for x, _ in before) == pytest.approx(min(x for x, _ in after))  # same baseline
    w_before, w_after = bar_widths(svg)
    assert w_after / w_before == pytest.approx(5.62 / 44.0, rel=1e-3)
    # The value labels are real text, right of their bars.
    for i, text in enumerate(("44 MB", "5.62 MB")):
        label = re.search(rf'<g id="chart-size-value-{i}">\s*<text[^>]*\bx="([\d.]+)"[^>]*>([^<]+)</text>', svg)
        assert label is not None and label.group(2) == text
        assert float(label.group(1)) > max(x for x, _ in shapes[f"chart-size-bar-{i}"])


def test_a_missing_side_draws_no_bar_and_a_dash() -> None:
    svg = charts.before_after("acc", "accuracy", 0.9, None)
    w_before, w_after = bar_widths(svg)
    assert w_before > 100 and w_after == 0
    assert re.search(r'<g id="chart-acc-value-1">\s*<text[^>]*>-</text>', svg)
    assert charts.before_after("acc", "accuracy", None, "n/a") == ""


def test_ids_are_scoped_so_charts_share_a_page() -> None:
    a = charts.before_after("size", "size", 2.0, 1.0)
    b = charts.before_after("params", "params", 2.0, 1.0)
    ids_a, ids_b = _ids(a), _ids(b)
    assert all(i.startswith("chart-size-") for i in ids_a) and all(i.startswith("chart-params-") for i in ids_b)
    assert len(set(ids_a)) == len(ids_a) and not set(ids_a) & set(ids_b)
    for svg, ids in ((a, ids_a), (b, ids_b)):
        refs = re.findall(r'url\(#([^)]+)\)|href="#([^"]+)"', svg)
        assert refs and all((r[0] or r[1]) in ids for r in refs)  # every reference resolves inside its chart
    assert not re.search(r"https?://|<\?xml|<!DOCTYPE|<metadata", a + b)


def test_user_text_is_escaped_and_never_mathtext() -> None:
    svg = charts.step_times("wall", [("<script>alert(1)</script>", 1.0), ("cost $\\frac{ $5", 2.0)])
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    assert "cost $\\frac{ $5" in svg  # drawn as typed (mathtext would raise on it)


def test_step_times_one_bar_per_step_in_proportion() -> None:
    long = "a step label much longer than twenty-eight characters"
    svg = charts.step_times("wall time per step (s)", [("prune", 3.2), ("distill", 61.7), ("skip", None), (long, 1.4)])
    widths = bar_widths(svg, "chart-steps-")
    assert len(widths) == 3
    assert [w / widths[1] for w in widths] == pytest.approx([3.2 / 61.7, 1.0, 1.4 / 61.7], rel=1e-3)
    assert "61.7 s" in svg and long[:27] + "…" in svg and long not in svg
    assert charts.step_times("wall", [("x", None)]) == ""


def test_curve_draws_every_point() -> None:
    svg = charts.curve("curve-1-loss", "loss", [(1, 1.92), (2, 1.11), (3, None), (4, 0.61)])
    line = chart_shapes(svg)["chart-curve-1-loss-line"]
    assert len(line) == 3
    assert [x for x, _ in line] == sorted(x for x, _ in line)  # epochs left to right
    assert line[0][1] < line[1][1] < line[2][1]  # a falling loss goes down the page (SVG y grows downward)
    assert ">epoch<" in svg
    assert charts.curve("c", "loss", [(None, 1.0)]) == ""


def test_chart_id_is_a_safe_selector() -> None:
    assert charts.chart_id("curve", 1, "eval_metric") == "chart-curve-1-eval-metric"
    assert charts.chart_id("a b\"<", "") == "chart-a-b-x"


def test_matplotlib_is_imported_only_to_draw() -> None:
    code = "import sys, api.main, api.charts; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_search_scatter_zooms_only_when_an_outlier_would_squash_the_trials_that_matter() -> None:
    from api.charts import _focus_range

    near = [0.95, 0.96, 0.93]
    assert _focus_range(near, [*near, 0.91]) is None  # everything close: the whole range is drawn
    lo, hi = _focus_range([*near, 0.2], [*near, 0.91]) or (0.0, 0.0)  # one trial at 0.2: zoom on the rest
    assert 0.2 < lo < 0.91 and 0.96 < hi < 1.0
    assert _focus_range([0.2, 0.3], []) is None  # nothing met and no budget: nothing to zoom on
    svg = str(charts.search_scatter("s", "t", [{"index": 4, "label": "#4", "x": 1.0, "y": 0.2, "met": False},
                                               {"index": 7, "label": "#7", "x": 2.0, "y": 0.95, "met": True}],
                                    "latency", "accuracy", 0.96, 0.94))
    assert 'id="chart-s-trial-4"' in svg and 'id="chart-s-trial-7"' in svg and "#4 0.2 ↓" in svg
